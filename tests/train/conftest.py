"""Small latent shards on the local stack's S3 for the training tests (built with the shard writer, not the
preprocessing job): 8 caption classes, each with its own latent pattern so CLAP can learn to match them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import shards, storage
from pipeline.components import save_vae
from pipeline.models.autoencoder import build_autoencoder

CLASSES = [
    "solo piano in C major",
    "string quartet in D minor",
    "brass band march in B flat",
    "flute duet in G major",
    "church organ fugue in E minor",
    "acoustic guitar waltz in A major",
    "jazz trio ballad in F major",
    "harpsichord sonata in D major",
]
LATENT_RATE = 44100 / 1024
CHANNELS = 64


def make_samples(n: int, seed: int, prefix: str) -> list[shards.Sample]:
    """``n`` segments of 0.5–3 s; class k has mean pattern ``patterns[k]`` (C,) plus a slow sinusoid and noise."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(1234).normal(0, 1.0, (len(CLASSES), CHANNELS))
    out = []
    for i in range(n):
        k = int(rng.integers(len(CLASSES)))
        frames = int(rng.integers(int(0.5 * LATENT_RATE), int(3 * LATENT_RATE)))
        t = np.arange(frames) / LATENT_RATE
        latents = (
            patterns[k][:, None]
            + 0.3 * np.sin(2 * np.pi * (k + 1) * 0.5 * t)[None]
            + rng.normal(0, 0.3, (CHANNELS, frames))
        )
        offset = float(rng.integers(0, 3)) * 3.0
        meta = {
            "caption": CLASSES[k],
            "seconds_total": float(np.ceil(offset + frames / LATENT_RATE + rng.integers(0, 5))),
            "offset_seconds": offset,
            "source_uri": f"synthetic://{prefix}/{i}",
            "source_sha256": "0" * 64,
            "augmentation": None,
            "sample_rate": 44100,
            "latent_rate": LATENT_RATE,
            "vae_id": "test",
            "meta": {},
        }
        out.append(shards.Sample(key=f"{prefix}_{i:05d}", meta=meta, latents=latents.astype(np.float16)))
    return out


def write_dataset(out: str, vae_uri: str, train_shards: tuple[int, ...] = (24, 24, 16), val: int = 32) -> str:
    stats = []
    for number, count in enumerate(train_shards):
        samples = make_samples(count, seed=number, prefix=f"train{number}")
        stats.append(shards.write_shard(out, shards.shard_name("train", number), samples))
    stats.append(shards.write_shard(out, shards.shard_name("val", 0), make_samples(val, seed=99, prefix="val")))
    shards.write_index(
        out,
        vae_id=vae_uri,
        vae_config_hash="test",
        latent_channels=CHANNELS,
        latent_rate=LATENT_RATE,
        shards=stats,
        errors=[],
    )
    return out


@pytest.fixture(scope="session")
def dataset_writer():
    """:func:`write_dataset`, for tests that need their own copy of the latent shards (e.g. to break one)."""
    return write_dataset


@pytest.fixture(scope="session")
def latent_dataset(local_stack) -> str:
    """s3:// preprocess OUT with 3 train shards (uneven over 2 ranks), 1 val shard and a tiny VAE beside it."""
    prefix = local_stack.s3_prefix("train-data")
    vae_uri = storage.join(prefix, "vae")
    torch.manual_seed(0)
    vae = build_autoencoder("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        save_vae(vae, Path(tmp))
        for name in ("model.safetensors", "config.json"):
            storage.write_file(storage.join(vae_uri, name), Path(tmp) / name)
    return write_dataset(storage.join(prefix, "latents"), vae_uri)


def _train_config(kind: str, shards_out: str, checkpoints: str, name: str, **overrides):
    """A tiny TrainConfig for 2 half-CPU workers."""
    from pipeline.config import TrainConfig

    raw = {
        "kind": kind,
        "data": {"shards": shards_out, "window_seconds": 1.0, "shuffle_buffer": 16, "holdout_split": "val"},
        "run": {
            "name": name,
            "checkpoint_uri": checkpoints,
            "experiment": "longplay-tests",
            "max_steps": 20,
            "checkpoint_every": 10,
            "log_every": 5,
            "demo_every": 1000,
        },
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5},
        "deepspeed": {
            "zero_stage": 1,
            "precision": "fp32",
            "micro_batch": 8,
            "lr": 1e-3,
            "warmup_steps": 5,
            "betas": [0.9, 0.98],
            "decay": "constant",
        },
        "ema": {"decay": 0.9},
        "model": {"preset": "tiny"},
        "demo_prompts": ["solo piano in C major"],
        "demo_seconds": [1.0],
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return TrainConfig.model_validate(raw)


@pytest.fixture(scope="session")
def train_config():
    """``train_config(kind, shards, checkpoints, name, run__max_steps=5, ...)`` → a tiny TrainConfig."""
    return _train_config


def write_audio_dataset(out: str, shard_sizes: tuple[int, ...] = (6, 4)) -> str:
    """Audio shards (``--vae none`` layout): 1 s stereo tones with a little noise as KEY.flac."""
    import io

    import soundfile as sf

    rng = np.random.default_rng(0)
    stats = []
    for number, count in enumerate(shard_sizes):
        samples = []
        for i in range(count):
            t = np.arange(44100) / 44100
            freq = float(rng.uniform(110, 880))
            audio = np.stack([np.sin(2 * np.pi * freq * t), np.sin(2 * np.pi * 1.5 * freq * t)]) * 0.3
            audio += rng.normal(0, 0.01, audio.shape)
            buf = io.BytesIO()
            sf.write(buf, audio.T.astype(np.float32), 44100, format="FLAC")
            meta = {
                "caption": f"tone {freq:.0f} Hz",
                "seconds_total": 1.0,
                "offset_seconds": 0.0,
                "segment_seconds": 1.0,
                "source_uri": f"synthetic://tone/{number}/{i}",
                "source_sha256": "0" * 64,
                "augmentation": None,
                "sample_rate": 44100,
                "latent_rate": None,
                "vae_id": None,
                "meta": {},
            }
            samples.append(shards.Sample(key=f"tone{number}_{i:03d}", meta=meta, flac=buf.getvalue()))
        stats.append(shards.write_shard(out, shards.shard_name("train", number), samples))
    shards.write_index(
        out, vae_id="none", vae_config_hash="none", latent_channels=2, latent_rate=44100.0, shards=stats, errors=[]
    )
    return out


@pytest.fixture(scope="session")
def audio_dataset(local_stack) -> str:
    return write_audio_dataset(storage.join(local_stack.s3_prefix("train-audio"), "audio"))
