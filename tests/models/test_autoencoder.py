"""The autoencoder: paper-sized parameter counts (meta device), framing, the VAE bottleneck, chunked long-audio
encode/decode against a full pass, and our save/load round trip."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.components import load_vae, save_vae
from pipeline.models import blocks
from pipeline.models.autoencoder import (
    AUTOENCODER_PRESETS,
    Autoencoder,
    AutoencoderConfig,
    build_autoencoder,
    vae_bottleneck,
)
from pipeline.models.blocks import encoder_context_latents, encoder_reach

SR = 44100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These small convolutions are memory-bound: on the shared 2-core test machine a second intra-op thread
    mostly spins against other suites (measured ~2x slower wall time under load), so use one and restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> Autoencoder:
    torch.manual_seed(0)
    model = build_autoencoder("tiny").eval()
    # Non-zero Snake parameters, so a mapping or reshaping mistake would show in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.normal_(0.0, 0.3)
    return model


def _music(seconds: float, seed: int = 0) -> torch.Tensor:
    """(1, 2, N) stereo test signal: two detuned tones plus a little noise, peak ~0.5."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(round(seconds * SR)) / SR
    left = 0.3 * torch.sin(2 * math.pi * 220.0 * t) + 0.2 * torch.sin(2 * math.pi * 331.0 * t)
    right = 0.3 * torch.sin(2 * math.pi * 221.5 * t)
    audio = torch.stack([left, right])[None] + 0.05 * torch.randn(1, 2, t.numel(), generator=g)
    return audio.float()


@pytest.mark.parametrize(("preset", "expected"), [("sa1", 133.4e6), ("sa-open", 156.1e6)])
def test_paper_parameter_counts_within_2_percent(preset: str, expected: float) -> None:
    model = build_autoencoder(preset, device="meta")
    n = sum(p.numel() for p in model.parameters())  # on the meta device; weight-norm g and v both count
    assert abs(n - expected) / expected < 0.02, f"{preset}: {n / 1e6:.2f}M parameters, expected ~{expected / 1e6}M"


def test_preset_framing() -> None:
    assert build_autoencoder("sa1", device="meta").downsampling == 1024
    sa_open = build_autoencoder("sa-open", device="meta")
    assert (sa_open.downsampling, sa_open.latent_channels, sa_open.latent_rate) == (2048, 64, SR / 2048)
    tiny = build_autoencoder("tiny", device="meta")
    assert (tiny.downsampling, tiny.latent_channels, tiny.sample_rate) == (1024, 64, SR)


def test_tiny_encode_decode_shapes_and_kl(tiny: Autoencoder) -> None:
    audio = _music(2.0)[..., : 2 * SR + 123]  # not a multiple of 1024
    n = audio.shape[-1]
    with torch.no_grad():
        latents = tiny.encode(audio)
        sampled, kl = tiny.encode_with_kl(audio, generator=torch.Generator().manual_seed(1))
        decoded = tiny.decode(latents)
        reconstruction, kl_fwd = tiny(audio)
    assert latents.shape == (1, 64, math.ceil(n / 1024))
    assert sampled.shape == latents.shape and not torch.equal(sampled, latents)
    assert decoded.shape == (1, 2, latents.shape[-1] * 1024)
    assert reconstruction.shape == audio.shape
    assert kl.ndim == 0 and torch.isfinite(kl) and kl > 0 and torch.isfinite(kl_fwd)
    assert torch.isfinite(decoded).all()


def test_vae_bottleneck_maths() -> None:
    # mean 0 and std ≈ 1 (softplus(s) + 1e-4 = 1 at s = log(e - 1)) is the prior: KL ≈ 0.
    scale = torch.full((2, 3, 5), math.log(math.e - 1) - 1e-4)
    latents, kl = vae_bottleneck(torch.cat([torch.zeros(2, 3, 5), scale], dim=1), sample=False)
    assert torch.equal(latents, torch.zeros(2, 3, 5))
    assert abs(kl.item()) < 1e-5
    # a unit mean shift costs mean² = 1 per channel, summed over 3 channels
    _, kl = vae_bottleneck(torch.cat([torch.ones(2, 3, 5), scale], dim=1), sample=False)
    assert kl.item() == pytest.approx(3.0, abs=1e-4)


def test_encode_rejects_wrong_layout(tiny: Autoencoder) -> None:
    with pytest.raises(ValueError, match=r"\(B, 2, N\)"):
        tiny.encode(torch.zeros(1, 1000))
    with pytest.raises(ValueError, match="latents must be"):
        tiny.decode(torch.zeros(1, 3, 10))


def test_chunked_encode_of_three_minutes_matches_full_pass(tiny: Autoencoder) -> None:
    audio = _music(180.0)[..., :-777]  # a ragged end exercises the right padding
    with torch.no_grad():
        full = tiny.encode(audio)
    chunked = tiny.encode_chunked(audio, chunk_seconds=10.0)  # 19 windows, default context (8 frames a side)
    assert chunked.shape == full.shape == (1, 64, math.ceil(audio.shape[-1] / 1024))
    # Windows with a full receptive field of context differ from the full pass only by float rounding
    # (convolutions of different lengths sum in different orders): tolerance 1e-5 of the latents' range.
    error = (chunked - full).abs().max() / full.abs().max()
    assert error < 1e-5, f"relative max abs difference {error:.2e}"


def test_encoder_reach_is_the_receptive_field(tiny: Autoencoder) -> None:
    """The context chunked encoding keeps is computed, not measured: check it against the gradient of one latent
    frame, whose non-zero span over the audio is the receptive field, sample-exact."""
    d, j = tiny.downsampling, 32
    audio = _music(2.0)[..., : 64 * d].clone().requires_grad_(True)
    tiny.encoder(audio)[0, :, j].sum().backward()
    touched = audio.grad.abs().sum(dim=(0, 1)).nonzero().flatten()
    left, right = encoder_reach(tiny.cfg.strides, tiny.cfg.encoder_out_kernel)
    assert (int(touched.min()), int(touched.max())) == (j * d - left, j * d + right) == (j * d - 7424, j * d + 8447)
    # 8 frames a side hold the first kept frame's field (left) and the last one's (right + 1 − d); 7 would not.
    assert encoder_context_latents(tiny.cfg.strides, tiny.cfg.encoder_out_kernel) == 8
    assert 7 * d < left <= 8 * d and 7 * d < right + 1 - d <= 8 * d


def test_chunked_decode_matches_full_pass(tiny: Autoencoder) -> None:
    latents = torch.randn(1, 64, 500, generator=torch.Generator().manual_seed(3))  # ~11.6 s
    with torch.no_grad():
        full = tiny.decode(latents)
    chunked = tiny.decode_chunked(latents, chunk_seconds=3.0)  # 6 windows of <= 129 frames, 20 of context a side
    assert chunked.shape == full.shape
    error = (chunked - full).abs().max() / full.abs().max()
    assert error < 1e-5, f"relative max abs difference {error:.2e}"


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_inference_in_time_tiles_changes_no_bit(tiny: Autoencoder, monkeypatch, threads: int) -> None:
    """On the CPU, inference runs long inputs' Snakes and residual units in time tiles (blocks.time_tile), for
    cache locality: latents and decoded audio must be bit-for-bit those of the whole-tensor pass, with ragged last
    tiles, the input's two ends and a batch of two."""
    audio = torch.cat([_music(3.0, seed=1), _music(3.0, seed=2)])[..., :-777]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the tile length's thread count, not torch's
    with torch.inference_mode():
        monkeypatch.setattr(blocks, "INFERENCE_TILE_ELEMENTS", 1 << 40)  # never tiled
        assert blocks.time_tile(torch.empty(2, 16, audio.shape[-1])) is None
        whole = tiny.encode(audio)
        heard = tiny.decode(whole)
        monkeypatch.setattr(blocks, "INFERENCE_TILE_ELEMENTS", 1 << 12)  # the narrowest tiles, down to every stage
        assert blocks.time_tile(torch.empty(2, 16, audio.shape[-1])) == blocks.MIN_TILE_STEPS
        tiled = tiny.encode(audio)
        tiled_heard = tiny.decode(whole)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 convolutions of other widths round differently
            assert blocks.time_tile(torch.empty(2, 16, audio.shape[-1])) is None
    assert torch.equal(tiled, whole)
    assert torch.equal(tiled_heard, heard)
    with torch.enable_grad():  # training runs whole tensors: autograd keeps them anyway
        assert blocks.time_tile(torch.empty(2, 16, audio.shape[-1])) is None


def test_too_little_context_is_visible(tiny: Autoencoder) -> None:
    """Guards the test above: without context the chunk seams do differ, so the comparison has teeth."""
    audio = _music(10.0)
    with torch.no_grad():
        full = tiny.encode(audio)
    seams = tiny.encode_chunked(audio, chunk_seconds=2.0, overlap_seconds=0.0)
    assert (seams - full).abs().max() / full.abs().max() > 1e-3


def test_save_and_load_round_trip(tiny: Autoencoder, tmp_path) -> None:
    save_vae(tiny, tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    assert loaded.cfg == tiny.cfg
    audio = _music(1.0)
    with torch.no_grad():
        assert torch.equal(loaded.encode(audio), tiny.encode(audio))
        latents = tiny.encode(audio)
        assert torch.equal(loaded.decode(latents), tiny.decode(latents))


def test_config_validation_and_json_round_trip() -> None:
    cfg = AUTOENCODER_PRESETS["sa1"]
    assert AutoencoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="autoencoder.strides"):
        AutoencoderConfig(strides=(3, 4), encoder_multipliers=(1, 2), decoder_multipliers=(1, 2))
    with pytest.raises(ValueError, match="autoencoder.encoder_multipliers"):
        AutoencoderConfig(strides=(2, 4))
    with pytest.raises(ValueError, match="autoencoder.bogus"):
        AutoencoderConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="model.preset"):
        build_autoencoder("huge", device="meta")


def test_weight_norm_off_builds_plain_convs() -> None:
    cfg = AutoencoderConfig(**{**AUTOENCODER_PRESETS["tiny"].to_dict(), "weight_norm": False})
    model = Autoencoder(cfg)
    assert not any("parametrizations" in k for k in model.state_dict())
    assert model.encode(torch.zeros(1, 2, 2048)).shape == (1, 64, 2)


@pytest.mark.parametrize(
    "changes",
    [{}, {"weight_norm": False}, {"conv_bias": True, "encoder_projection": True, "decoder_out_bias": True}],
    ids=["tiny", "plain-convs", "sa1-layout"],
)
def test_folding_a_latent_scale_keeps_the_reconstruction(changes: dict) -> None:
    """fold_latent_scale(s): latents s times smaller, the same audio out; the scale half of the moments untouched."""
    torch.manual_seed(0)
    model = Autoencoder(dataclasses.replace(AUTOENCODER_PRESETS["tiny"], **changes)).eval()
    audio = _music(1.0)
    with torch.no_grad():
        latents, moments, decoded = model.encode(audio), model.moments(audio), model.decode(model.encode(audio))
        model.fold_latent_scale(0.05)
        folded_latents, folded_moments = model.encode(audio), model.moments(audio)
        folded_decoded = model.decode(folded_latents)
    torch.testing.assert_close(folded_latents, latents / 0.05, rtol=1e-4, atol=1e-5)
    c = model.latent_channels
    torch.testing.assert_close(folded_moments[:, c:], moments[:, c:], rtol=0, atol=0)
    torch.testing.assert_close(folded_decoded, decoded, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="positive finite"):
        model.fold_latent_scale(0.0)
