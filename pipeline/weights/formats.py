"""Weights files as data: read tensors without unpickling, hash a set of weights, tell which layout a checkpoint is in
(``longplay``, ``stable-audio-tools`` or ``diffusers``; see :mod:`pipeline.weights`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names and raw bytes, in name order): the id of a set of weights (a VAE's
    ``vae_id`` in the shards, the CLAP behind an evaluation figure)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch checkpoint loaded with ``weights_only=True`` (never
    unpickling arbitrary objects). A checkpoint holding ``{"state_dict": {...}}`` (Lightning, stable-audio-tools)
    is unwrapped; non-tensor entries are dropped. Tensors are on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"{path}: unknown weights file type {path.suffix!r} (want .safetensors or .ckpt/.pt/.pth/.bin)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError... for the same cause
        raise ValueError(
            f"{path}: not loadable with torch.load(weights_only=True) ({type(exc).__name__}); it pickles objects. "
            "Re-save just its state_dict (or convert it to safetensors) and import that."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (empty dict when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc})") from exc


def _state_dict_keys(path: Path) -> list[str]:
    """Tensor names of a weights file; safetensors are read from the header only (checkpoints can be GBs)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    return list(load_state_dict_file(path))


def detect_format(src: str | os.PathLike) -> str:
    """``"longplay"``, ``"stable-audio-tools"`` or ``"diffusers"`` for a local file or directory (see module doc)."""
    src = Path(src)
    if src.is_dir():
        if (src / "model_index.json").is_file():
            return "diffusers"
        config = src / "config.json"
        if config.is_file():
            name = read_json(config).get("_class_name", "")
            if name == "longplay.Autoencoder":
                return "longplay"
            if name == "AutoencoderOobleck":
                return "diffusers"
            raise ValueError(f"{config}: unsupported _class_name {name!r}")
        raise ValueError(f"{src}: directory has neither config.json nor model_index.json")
    if not src.is_file():
        raise FileNotFoundError(f"weights not found: {src}")
    if src.suffix == ".safetensors" and read_safetensors_metadata(src).get("format") == "longplay":
        return "longplay"
    sibling = src.parent / "config.json"
    if sibling.is_file():
        name = read_json(sibling).get("_class_name", "")
        if name in ("longplay.Autoencoder", "AutoencoderOobleck"):
            return "longplay" if name.startswith("longplay") else "diffusers"
    keys = _state_dict_keys(src)
    if any(".layers.0." in k or k.startswith("model.model.") for k in keys):
        return "stable-audio-tools"
    if any(k.startswith(("encoder.block.", "decoder.block.")) for k in keys):
        return "diffusers"
    raise ValueError(f"{src}: no known key layout (first keys: {sorted(keys)[:3]})")
