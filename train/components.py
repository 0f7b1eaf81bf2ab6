"""The export layout the loops write. Loading a frozen VAE or CLAP is :mod:`pipeline.components` (``load_vae`` is
re-exported here for the loops that import it from this module).

Export of a trained CLAP (a directory; also what its MLflow registered model version points at)::

    model.safetensors     CLAP weights (EMA)
    tokenizer.json        the caption tokenizer it was trained with
    config.json           {"kind": "clap", "preset", "vocab_size", "latent_channels", "latent_rate"}
    train_config.json     the resolved TrainConfig of the run

The diffusion export adds what generation needs, so one URI is a whole bundle::

    model.safetensors     diffusion model weights (EMA);  config.json {"kind": "diffusion", "preset", ...}
    clap/                 the CLAP export above;          autoencoder/  the VAE (model.safetensors + config.json)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.components import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_vae
from pipeline.tracking import download_model

__all__ = ["CONFIG_FILE", "TOKENIZER_FILE", "WEIGHTS_FILE", "copy_export", "load_vae", "save_weights", "vae_uri"]


def vae_uri(configured: str | None, index: dict[str, Any]) -> str:
    """``model.vae`` if set, else the ``vae_id`` the shards were encoded with."""
    uri = configured or index.get("vae_id")
    if not uri:
        raise ValueError("model.vae: not set and the shard index names no vae_id")
    return str(uri)


def save_weights(weights: dict[str, torch.Tensor], path: Path, prefix: str = "") -> None:
    """Write the tensors under ``prefix`` (stripped) to a safetensors file."""
    from safetensors.torch import save_file

    picked = {k[len(prefix) :]: v.contiguous() for k, v in weights.items() if k.startswith(prefix)}
    save_file(picked, str(path), metadata={"format": "longplay"})


def copy_export(uri: str, target: Path) -> None:
    """Copy an export (any URI :func:`download_model` takes) into ``target``."""
    source = download_model(uri)
    shutil.copytree(source, target, dirs_exist_ok=True)
