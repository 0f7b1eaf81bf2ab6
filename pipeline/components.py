"""Trained components by URI: the one place that turns a URI into a frozen model, for every stage.

A URI is a local path, an s3:// prefix, an MLflow model URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/...``) or a training run's ``export`` folder (followed through its pointer, so a reader never sees half of
an export); :func:`pipeline.tracking.download_model` turns any of them into a local path. A VAE can also be
``preset:NAME`` or ``preset:NAME@seedN``: a freshly initialised preset, the same weights in every process.

Export layouts (what the training loops write and what is registered in MLflow)::

    VAE        model.safetensors + config.json (the AutoencoderConfig); also a stable-audio-tools checkpoint or a
               diffusers AutoencoderOobleck folder (pipeline.weights.autoencoder reads all three)
    CLAP       model.safetensors, tokenizer.json, config.json {"kind": "clap", "preset", "vocab_size", ...}
    bundle     model.safetensors, config.json {"kind": "diffusion", "preset", "latent_rate", "window_seconds", ...},
               clap/ (a CLAP export) and autoencoder/ (a VAE export): one URI that can generate. A T5-conditioned
               bundle names its encoder instead ({"text_encoder": "t5", "t5": URI}); a LoRA export holds only the
               adapters, with {"base": the base bundle's URI, "lora": the adapters' settings}

Preprocessing records which VAE encoded the shards as :func:`vae_id` and training reads that id back through
:func:`load_vae`, so the two stages agree by construction.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.generate import Bundle
from pipeline.models.autoencoder import Autoencoder, AutoencoderConfig, build_autoencoder
from pipeline.models.clap import CLAP, build_clap
from pipeline.models.conditioning import build_diffusion_model
from pipeline.text import CaptionTokenizer
from pipeline.text_conditioners import ClapText, TextConditioner
from pipeline.tracking import download_model
from pipeline.weights import weights_hash
from pipeline.weights.autoencoder import CONFIG_FILE, WEIGHTS_FILE, read_autoencoder, save_autoencoder

TOKENIZER_FILE = "tokenizer.json"
PRESET_SEED = 0  # "preset:NAME" means "preset:NAME@seed0": the seed its weights are initialised from


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """Where a stage runs: ``name`` ("cpu", "cuda", "cuda:1", ...), or CUDA when available and else the CPU.

    Asking for CUDA on a machine without it is a ValueError whose message is one line (the CLI exits 2 with it)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: {name!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} asked for, but CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {name} asked for, but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def parse_preset(uri: str) -> tuple[str, int]:
    """``preset:NAME`` or ``preset:NAME@seedN`` → (NAME, N), N defaulting to :data:`PRESET_SEED`."""
    name, at, seed = uri.removeprefix("preset:").partition("@seed")
    if not name or (at and not seed.isdigit()):
        raise ValueError(f"{uri}: expected preset:NAME or preset:NAME@seedN")
    return name, int(seed) if at else PRESET_SEED


def load_vae(
    uri: str | os.PathLike, device: str | torch.device = "cpu", config: AutoencoderConfig | None = None
) -> Autoencoder:
    """The frozen VAE ``uri`` names (eval mode, no grads) on ``device``.

    ``config`` overrides what cannot be read from the weights (``final_tanh`` of a bare stable-audio-tools
    checkpoint). An MLflow model or folder holding a bundle gives the bundle's ``autoencoder/``.
    """
    uri = str(uri)
    if uri.startswith("preset:"):
        name, seed = parse_preset(uri)
        with torch.random.fork_rng(devices=[]):  # every process builds the same weights, and our RNG is untouched
            torch.manual_seed(seed)
            vae = build_autoencoder(name)
    elif uri.startswith("sha256:"):
        raise ValueError(f"{uri}: a hash of VAE weights, not where they are; name the VAE's URI (model.vae)")
    else:
        with tempfile.TemporaryDirectory(prefix="longplay-vae-") as tmp:  # used only for remote URIs
            path = download_model(uri, tmp)
            for candidate in (path / "autoencoder", path / "artifacts" / "autoencoder"):
                if (candidate / CONFIG_FILE).is_file():  # a bundle: its VAE
                    path = candidate
                    break
            vae = read_autoencoder(path, config)
    return vae.to(device).eval().requires_grad_(False)


def save_vae(vae: Autoencoder, directory: str | Path) -> Path:
    """Write a VAE export (``model.safetensors`` + ``config.json``) that :func:`load_vae` reads; returns it."""
    return save_autoencoder(vae, directory)


def vae_id(model_or_uri: Autoencoder | str) -> str:
    """The id shards carry for the VAE that encoded them: ``preset:NAME@seedN`` for a preset (readable by
    :func:`load_vae`), else ``sha256:<first 16 hex of the weights' hash>``."""
    if isinstance(model_or_uri, str):
        if model_or_uri.startswith("preset:"):
            name, seed = parse_preset(model_or_uri)
            return f"preset:{name}@seed{seed}"
        model_or_uri = load_vae(model_or_uri)
    return f"sha256:{weights_hash(model_or_uri)[:16]}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _config(directory: Path, kind: str, source: str) -> dict[str, Any]:
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("kind") != kind:
        raise ValueError(f"{source}: not a {kind} export (kind={config.get('kind')!r})")
    return config


def load_clap(uri: str, device: str | torch.device = "cpu") -> tuple[CLAP, CaptionTokenizer, dict[str, Any]]:
    """A trained CLAP export (also a bundle's ``clap/``) → the frozen model (eval, no grads) on ``device``, its
    caption tokenizer and its config."""
    directory = download_model(uri)
    config = _config(directory, "clap", source=uri)
    # Exports written before ``text_pooling`` was recorded pooled the <s> state.
    clap = build_clap(config["preset"], int(config["vocab_size"]), text_pooling=config.get("text_pooling", "first"))
    clap.load_state_dict(_weights(directory / WEIGHTS_FILE), strict=True)
    tokenizer = CaptionTokenizer.load(directory / TOKENIZER_FILE)
    return clap.to(device).eval().requires_grad_(False), tokenizer, config


def load_text_conditioner(
    kind: str, uri: str, device: str | torch.device = "cpu", max_tokens: int | None = None
) -> TextConditioner:
    """The frozen text conditioner ``kind`` (``clap``: a CLAP export; ``t5``: a T5 encoder + tokenizer directory) at
    ``uri`` on ``device``; a T5 pads and truncates to ``max_tokens`` (the diffusion model's ``max_text_tokens``; a
    CLAP has its own context length). Errors name the config key that points there (``model.clap`` / ``model.t5``)."""
    if kind == "clap":
        try:
            clap, tokenizer, _ = load_clap(uri, device)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"model.clap: {err}") from err
        return ClapText(clap, tokenizer)
    if kind == "t5":
        from pipeline.t5 import T5Conditioner

        try:
            return T5Conditioner.load(uri, device, **({"max_tokens": max_tokens} if max_tokens else {}))
        except (ValueError, OSError) as err:  # FileNotFoundError included
            raise ValueError(f"model.t5: {err}") from err
    raise ValueError(f"model.text_encoder: {kind!r} is not clap or t5")


def load_bundle(uri: str, device: str | torch.device | None = None) -> Bundle:
    """A bundle ready to generate: the diffusion export at ``uri`` with its text conditioner and ``autoencoder/``, all
    on one device (``device``; default CUDA when available, else the CPU: :func:`resolve_device`). A LoRA export
    loads its base bundle and adds the adapters."""
    from pipeline import lora

    device = resolve_device(device)
    root = download_model(uri)
    config = _config(root, "diffusion", source=uri)
    if "lora" in config:
        base = load_bundle(str(config["base"]), device)
        expected = config["lora"].get("base_sha256")
        if expected and weights_hash(base.diffusion) != expected:
            raise ValueError(f"{uri}: its base {config['base']} is not the model the adapters were trained on")
        lora.add_adapters(base.diffusion, config["lora"])
        lora.load_adapters(base.diffusion, _weights(root / WEIGHTS_FILE))
        diffusion = base.diffusion.to(device).eval()
        return Bundle(base.autoencoder, base.text, diffusion, {**base.config, **config}, base.text_source)
    source = text_source(config, root)
    diffusion = build_diffusion_model(config["preset"])
    text = load_text_conditioner(*source, device, max_tokens=diffusion.cfg.max_text_tokens)
    _load_parameters(diffusion, _weights(root / WEIGHTS_FILE), root)
    return Bundle(
        autoencoder=load_vae(str(root / "autoencoder"), device),
        text=text,
        diffusion=diffusion.to(device).eval(),
        config=config,
        text_source=source,
    )


def text_source(config: dict[str, Any], root: Path) -> tuple[str, str]:
    """(kind, URI) of a bundle's text conditioner: its ``clap/`` folder, or the T5 its config.json names."""
    kind = str(config.get("text_encoder", "clap"))
    return kind, str(config["t5"]) if kind == "t5" else str(root / "clap")


def _load_parameters(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Load exported (EMA) weights: every parameter must be there; non-persistent state may be absent."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = {name for name, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise ValueError(
            f"{where}: weights do not fit the preset (missing {sorted(params & set(missing))[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
