"""Seeded augmentation chains and the batched VAE encoder (no Ray, no storage)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from pipeline import components
from pipeline.config import ConfigError
from pipeline.weights import weights_hash
from preprocess import augment, encode

CHAIN = [
    {"name": "Gain", "min_gain_db": -6.0, "max_gain_db": 6.0, "p": 1.0},
    {"name": "AddGaussianSNR", "min_snr_db": 20.0, "max_snr_db": 40.0, "p": 0.5},
]


def _audio(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((2, int(44100 * seconds))) * 0.1).astype(np.float32)


def test_copies_are_reproducible_and_recorded():
    chain = augment.build_chain(CHAIN)
    x = _audio()
    seed = augment.copy_seed(0, "ab" * 32, 1)
    random.seed(123)
    a, rec_a = augment.apply(chain, x, seed)
    outside = random.random()
    random.seed(123)
    b, rec_b = augment.apply(chain, x, seed)
    assert random.random() == outside  # the global RNG state is left as it was
    np.testing.assert_array_equal(a, b)
    assert rec_a == rec_b and not np.array_equal(a, x)
    assert [t["name"] for t in rec_a] == ["Gain", "AddGaussianSNR"] and rec_a[0]["applied"] is True
    record = augment.record(seed, 1, rec_a)
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    other = augment.copy_seed(0, "ab" * 32, 2)
    assert other != seed and not np.array_equal(augment.apply(chain, x, other)[0], a)
    assert augment.copy_seed(1, "ab" * 32, 1) != seed  # the config seed matters too


def test_bad_chains_are_config_errors():
    assert augment.build_chain([]) is None
    with pytest.raises(ConfigError, match=r"augment.chain.0.name: 'Nope'"):
        augment.build_chain([{"name": "Nope"}])
    with pytest.raises(ConfigError, match=r"augment.chain.0: Gain"):
        augment.build_chain([{"name": "Gain", "not_an_arg": 1}])


def test_preset_vae_is_seeded_and_identified():
    spec = encode.resolve_vae("preset:tiny")
    assert spec.vae_id == "preset:tiny@seed0" and spec.latent_channels == 64
    assert spec.latent_rate == pytest.approx(44100 / 1024)
    a, b = components.load_vae("preset:tiny"), components.load_vae("preset:tiny")
    assert weights_hash(a) == weights_hash(b)
    assert encode.resolve_vae("none").audio_only
    with pytest.raises(ConfigError, match="--vae"):
        encode.resolve_vae("preset:nope")


def test_exported_vae_is_identified_by_its_weights(tmp_path):
    model = components.load_vae("preset:tiny")
    components.save_vae(model, tmp_path / "vae")
    spec = encode.resolve_vae(str(tmp_path / "vae"))
    assert spec.vae_id == f"sha256:{weights_hash(model)[:16]}"
    encode.check_loaded(components.load_vae(str(tmp_path / "vae")), spec)
    with pytest.raises(RuntimeError, match="worker loaded weights"):
        other = spec.__class__(**{**spec.__dict__, "vae_id": "sha256:0"})
        encode.check_loaded(components.load_vae("preset:tiny"), other)


def test_batched_encode_matches_one_by_one():
    model = components.load_vae("preset:tiny")
    pieces = [_audio(0.5, 1), _audio(0.3, 2), _audio(0.5, 3), _audio(0.5, 4), _audio(1.5, 5)]
    batched = encode.encode(model, pieces, batch_size=2, chunk_seconds=1.0)
    for piece, z in zip(pieces, batched, strict=True):
        assert z.dtype == np.float16 and z.shape == (64, math.ceil(piece.shape[1] / 1024))
        with torch.inference_mode():
            alone = model.encode(torch.from_numpy(piece)[None])[0].numpy()
        np.testing.assert_allclose(z.astype(np.float32), alone, atol=2e-3, rtol=2e-3)
