"""Weight import: read checkpoints without unpickling, recognise their layout, convert them to our export.

Formats understood (``detect_format``):

- ``longplay``: ours. A directory with ``model.safetensors`` + ``config.json`` (``_class_name``
  ``longplay.Autoencoder``), or one ``.safetensors`` file whose metadata says ``format: longplay``.
- ``stable-audio-tools``: a ``.ckpt``/``.pt``/``.safetensors`` state dict (optionally under ``state_dict``) with
  the autoencoder under ``pretransform.model.`` (a diffusion checkpoint such as Stable Audio Open's), under
  ``autoencoder.`` (an autoencoder training run) or bare, and the DiT under ``model.model.``.
- ``diffusers``: an ``AutoencoderOobleck`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a
  whole ``StableAudioPipeline`` folder (``model_index.json`` with ``vae/`` and ``transformer/``).

``import_weights(src, dst)`` writes one safetensors file: autoencoder tensors under ``autoencoder.``; when the
checkpoint holds a diffusion model and ``pipeline.weights.dit`` (the DiT's own mapping) is available, DiT tensors
under ``dit.`` and timing-conditioner tensors under ``timing.``; the configs as JSON in the metadata
(``autoencoder_config``, and ``dit_config`` when the source has a config file).

A whole model that generates, DiT + timing conditioners + VAE + the T5 it names, is a bundle instead:
``pipeline.weights.bundle.import_bundle(src, dst_folder, preset, t5)`` (``longplay weights import SRC --to FOLDER``)
checks the source's architecture against a diffusion preset field by field and writes what
``pipeline.components.load_bundle`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.weights.formats import (
    TORCH_SUFFIXES,
    detect_format,
    load_state_dict_file,
    read_json,
    read_safetensors_metadata,
    weights_hash,
)

__all__ = [
    "TORCH_SUFFIXES",
    "detect_format",
    "import_weights",
    "load_state_dict_file",
    "read_safetensors_metadata",
    "weights_hash",
]

FORMAT_VERSION = "1"  # of the single-file export written by import_weights


def _load_folder(folder: Path) -> dict[str, torch.Tensor] | None:
    """All tensors of the ``*.safetensors`` files in ``folder`` (sharded checkpoints come as several), or None."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(load_state_dict_file(file))
    return state_dict


def _config_json(config: Any) -> str | None:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return json.dumps(dataclasses.asdict(config))
    return None


def _convert_diffusion(src: Path, source_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The DiT (``dit.*``) and timing conditioner (``timing.*``) tensors of ``src`` in our layout, mapped by
    ``pipeline.weights.dit`` (owned by the DiT), plus metadata (``dit_config`` JSON when a config is found) and a
    list of what was skipped. Empty when the checkpoint holds no diffusion model."""
    if source_format == "diffusers" and src.is_dir():
        backbone, timing = _load_folder(src / "transformer"), _load_folder(src / "projection_model")
        config_file = src / "transformer" / "config.json"
    elif source_format == "stable-audio-tools" and src.is_file():
        backbone = load_state_dict_file(src)
        backbone = backbone if any(k.startswith("model.model.") for k in backbone) else None
        timing = backbone
        config_file = src.parent / "model_config.json"
    else:
        return {}, {}, []
    if backbone is None:
        return {}, {}, []
    try:
        from pipeline.weights import dit as dit_weights
    except ImportError:
        return {}, {}, ["dit (pipeline.weights.dit is not available)"]
    suffix = "diffusers" if source_format == "diffusers" else "stable_audio_tools"
    tensors = {f"dit.{k}": v for k, v in getattr(dit_weights, f"dit_state_dict_from_{suffix}")(backbone).items()}
    skipped, metadata = [], {}
    timing_fn = getattr(dit_weights, f"timing_state_dict_from_{suffix}", None)
    try:
        if timing is not None and timing_fn is not None:
            tensors.update({f"timing.{k}": v for k, v in timing_fn(timing).items()})
        else:
            skipped.append("timing conditioners (not found)")
    except KeyError as exc:  # a checkpoint without timing conditioners
        skipped.append(f"timing conditioners ({exc})")
    config_fn = getattr(dit_weights, f"dit_config_from_{suffix}", None)
    if config_file.is_file() and config_fn is not None:
        config = _config_json(config_fn(read_json(config_file)))
        if config is not None:
            metadata["dit_config"] = config
    return tensors, metadata, skipped


def import_weights(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, Any]:
    """Convert a checkpoint (any format above) into our single-file safetensors export at ``dst``.

    The autoencoder is always converted (it is required); a DiT is converted when the checkpoint holds one and
    ``pipeline.weights.dit`` provides the mapping. Returns a summary: source and destination, source format,
    and per component the tensor and parameter counts (and the autoencoder config).
    """
    from safetensors.torch import save_file

    from pipeline.weights.autoencoder import read_autoencoder

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"--to: destination must be a .safetensors file, got {dst}")
    source_format = detect_format(src)
    vae_dir = src / "vae" if src.is_dir() and (src / "model_index.json").is_file() else src
    model = read_autoencoder(vae_dir)
    tensors = {f"autoencoder.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    summary: dict[str, Any] = {
        "src": str(src),
        "dst": str(dst),
        "source_format": source_format,
        "components": {
            "autoencoder": {
                "tensors": len(tensors),
                "parameters": sum(v.numel() for v in tensors.values()),
                "config": model.cfg.to_dict(),
            }
        },
    }
    diffusion, diffusion_metadata, skipped = _convert_diffusion(src, source_format)
    if diffusion:
        tensors.update({k: v.contiguous() for k, v in diffusion.items()})
        for part in ("dit", "timing"):
            chosen = [v for k, v in diffusion.items() if k.startswith(part + ".")]
            if chosen:
                summary["components"][part] = {"tensors": len(chosen), "parameters": sum(v.numel() for v in chosen)}
    if skipped:
        summary["skipped"] = skipped
    metadata = {
        "format": "longplay",
        "format_version": FORMAT_VERSION,
        "source_format": source_format,
        "autoencoder_config": json.dumps(model.cfg.to_dict()),
        **diffusion_metadata,
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=metadata)
    return summary
