"""Frozen components a loop reads (the VAE; a trained CLAP comes from :func:`pipeline.generate.load_clap`) and the
export layout the loops write.

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

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.models.autoencoder import Autoencoder, build_autoencoder
from pipeline.tracking import download_model, resolve_export

log = logging.getLogger(__name__)

WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
PRESET_SEED = 0  # "preset:NAME" VAEs are freshly initialised from this seed, the convention preprocessing follows


def load_vae(uri: str) -> Autoencoder:
    """The frozen VAE: ``preset:NAME`` (initialised from :data:`PRESET_SEED`), a local/s3:// export or models:/…"""
    if uri.startswith("preset:"):
        # "preset:tiny" or the vae_id preprocessing records for it, "preset:tiny@seed0"
        name, _, seed = uri.removeprefix("preset:").partition("@seed")
        with torch.random.fork_rng():
            torch.manual_seed(int(seed) if seed else PRESET_SEED)
            vae = build_autoencoder(name)
    elif uri.startswith(("models:/", "runs:/")):
        vae = Autoencoder.from_pretrained(download_model(uri))
    else:
        vae = Autoencoder.from_pretrained(resolve_export(uri))  # a run's export/: the version its pointer names
    return vae.eval().requires_grad_(False)


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
    import shutil

    source = download_model(uri)
    shutil.copytree(source, target, dirs_exist_ok=True)
