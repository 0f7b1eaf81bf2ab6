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
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = "1"  # of the single-file export written by import_weights
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


def _read_json(path: Path) -> dict[str, Any]:
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
            name = _read_json(config).get("_class_name", "")
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
        name = _read_json(sibling).get("_class_name", "")
        if name in ("longplay.Autoencoder", "AutoencoderOobleck"):
            return "longplay" if name.startswith("longplay") else "diffusers"
    keys = _state_dict_keys(src)
    if any(".layers.0." in k or k.startswith("model.model.") for k in keys):
        return "stable-audio-tools"
    if any(k.startswith(("encoder.block.", "decoder.block.")) for k in keys):
        return "diffusers"
    raise ValueError(f"{src}: no known key layout (first keys: {sorted(keys)[:3]})")


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
        config = _config_json(config_fn(_read_json(config_file)))
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
