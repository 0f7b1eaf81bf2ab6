"""Fixtures shared by the library's tests."""

from __future__ import annotations

import json

import pytest
import torch
from bundles import write_clap_export  # tests/ is on sys.path (pytest puts the rootless conftest's folder there)
from safetensors.torch import save_file

from pipeline.components import save_vae
from pipeline.models.autoencoder import build_autoencoder
from pipeline.models.conditioning import build_diffusion_model

CAPTIONS = [f"{i} {c} in {k} major" for i in range(20) for c in ("piano", "organ") for k in ("C", "D")]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A bundle laid out like `train/diffusion.py`'s export: model + config, clap/, autoencoder/."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    write_clap_export(root / "clap", CAPTIONS)
    model = build_diffusion_model("tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    vae = build_autoencoder("tiny")
    save_vae(vae, root / "autoencoder")
    config = {"kind": "diffusion", "preset": "tiny", "latent_rate": vae.latent_rate, "window_seconds": 2.0}
    (root / "config.json").write_text(json.dumps(config))
    return root
