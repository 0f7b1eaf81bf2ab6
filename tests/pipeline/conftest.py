"""Fixtures shared by the library's tests."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline.components import save_vae
from pipeline.models.autoencoder import build_autoencoder
from pipeline.models.clap import build_clap
from pipeline.models.conditioning import build_diffusion_model
from pipeline.text import train_tokenizer

CAPTIONS = [f"{i} {c} in {k} major" for i in range(20) for c in ("piano", "organ") for k in ("C", "D")]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A bundle laid out like `train/diffusion.py`'s export: model + config, clap/, autoencoder/."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300)
    (root / "clap").mkdir()
    tokenizer.save(root / "clap" / "tokenizer.json")
    clap = build_clap("tiny", vocab_size=tokenizer.vocab_size)
    save_file({k: v.contiguous() for k, v in clap.state_dict().items()}, str(root / "clap" / "model.safetensors"))
    clap_cfg = {"kind": "clap", "preset": "tiny", "vocab_size": tokenizer.vocab_size}
    (root / "clap" / "config.json").write_text(json.dumps(clap_cfg))
    model = build_diffusion_model("tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    vae = build_autoencoder("tiny")
    save_vae(vae, root / "autoencoder")
    config = {"kind": "diffusion", "preset": "tiny", "latent_rate": vae.latent_rate, "window_seconds": 2.0}
    (root / "config.json").write_text(json.dumps(config))
    return root
