"""Bundles for the tests, written rather than trained (seeded random weights): a tiny CLAP export, a diffusion bundle
as `train diffusion` exports it (the fine-tuning tests' base), and the training objective on one fixed batch (where a
fine-tune starts)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.components import save_vae
from pipeline.models.autoencoder import build_autoencoder
from pipeline.models.clap import build_clap
from pipeline.models.conditioning import build_diffusion_model
from pipeline.text import train_tokenizer
from train.diffusion import diffusion_loss

LATENT_RATE = 44100 / 1024  # the tiny VAE's, as in the latent shards (tests/train/conftest.py)
CLASSES = ["solo piano in C major", "string quartet in D minor", "brass band march in B flat"]  # some of the shards'


def write_clap_export(folder: Path, captions: list[str]) -> Path:
    """A tiny CLAP as `train clap` exports it: a tokenizer trained on ``captions``, random weights (torch's RNG)."""
    folder.mkdir(parents=True)
    tokenizer = train_tokenizer(captions, vocab_size=300)
    tokenizer.save(folder / "tokenizer.json")
    clap = build_clap("tiny", vocab_size=tokenizer.vocab_size)
    save_file({k: v.contiguous() for k, v in clap.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"kind": "clap", "preset": "tiny", "vocab_size": tokenizer.vocab_size, "text_pooling": "mean"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_base_bundle(root: Path, text_encoder: str, t5_uri: str | None = None) -> Path:
    """A bundle as `train diffusion` exports it, with seeded random weights: diffusion model, text conditioner (a tiny
    CLAP export in clap/, or a reference to a T5), and the tiny VAE (seed 0, as the latent shards')."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    model = build_diffusion_model("tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    config = {"kind": "diffusion", "preset": "tiny", "latent_rate": LATENT_RATE, "window_seconds": 1.0}
    if text_encoder == "clap":
        write_clap_export(root / "clap", CLASSES * 4)
    else:
        config.update({"text_encoder": "t5", "t5": t5_uri})
    torch.manual_seed(0)
    save_vae(build_autoencoder("tiny"), root / "autoencoder")
    (root / "config.json").write_text(json.dumps(config))
    return root


def fixed_batch_loss(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor, channels: int = 64) -> float:
    """The training objective on one fixed batch of 3 latent crops, with the same draws of t, noise and CFG dropout
    every call: two models with the same weights give the same number, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    batch = {
        "x": torch.randn(3, channels, 43, generator=gen),
        "seconds_start": torch.zeros(3),
        "seconds_total": torch.tensor([1.0, 2.0, 3.0]),
    }
    torch.manual_seed(5)
    return diffusion_loss(model.train(), batch, tokens, mask, cfg_dropout=0.1).item()
