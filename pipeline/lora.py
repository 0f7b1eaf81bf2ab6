"""LoRA adapters on a diffusion model's backbone, with peft (no hand-written LoRA).

    model.requires_grad_(False)                     every base weight frozen (timing conditioners included)
    peft.inject_adapter_in_model(LoraConfig, backbone)   each target Linear → base_layer + lora_A/lora_B (trainable)

The adapters' parameters are the model's state-dict entries whose names hold ``lora_``; the base weights keep their
values bit for bit (they move to ``….base_layer.weight``). A LoRA export holds only the adapters plus the settings
below (``settings``) and the base bundle's URI, so generation rebuilds the base, adds the adapters and loads them;
``merge`` folds them into the base weights with peft's own merge (a plain model, same names as the base).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name: it appears in the parameter names (….lora_A.default.weight)


def settings(rank: int, alpha: float | None, dropout: float, target_modules: list[str]) -> dict[str, Any]:
    """The adapters' settings as a bundle's config.json records them (alpha defaults to the rank; the training loop
    adds ``base_sha256``, the base model's weights hash, which loading checks)."""
    return {
        "rank": int(rank),
        "alpha": float(alpha if alpha is not None else rank),
        "dropout": float(dropout),
        "target_modules": list(target_modules),
    }


def add_adapters(model: nn.Module, lora: dict[str, Any]) -> list[str]:
    """Freeze ``model`` and give its ``backbone`` LoRA adapters (``lora``: :func:`settings`); returns the names of the
    trainable (adapter) parameters. Raises ValueError naming ``model.lora.target_modules`` when nothing matches."""
    from peft import LoraConfig, inject_adapter_in_model

    backbone = model.backbone
    wanted = set(lora["target_modules"])
    if not any(name.rsplit(".", 1)[-1] in wanted for name, _ in backbone.named_modules()):
        raise ValueError(f"model.lora.target_modules: no backbone layer is named any of {sorted(wanted)}")
    model.requires_grad_(False)
    config = LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=sorted(wanted)
    )
    inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def adapter_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors of a state dict."""
    return {k: v for k, v in weights.items() if is_adapter(k)}


def load_adapters(model: nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    """Load adapter weights into a model :func:`add_adapters` prepared; every adapter must be there, nothing else."""
    expected = {k for k in model.state_dict() if is_adapter(k)}
    if set(adapters) != expected:
        missing, unexpected = sorted(expected - set(adapters)), sorted(set(adapters) - expected)
        raise ValueError(f"LoRA adapters do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(adapters, strict=False)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (peft's merge) and put the plain layer back: the model then has the
    base model's parameter names and the fine-tuned behaviour."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model
