"""Backbones (U-Net, DiT), timing conditioners and the conditioned diffusion model."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from pipeline import diffusion as D
from pipeline.models.conditioning import (
    DIFFUSION_PRESETS,
    ConditionedDiffusionModel,
    DiffusionModelConfig,
    TimingConditioner,
    build_diffusion_model,
    guided_model_fn,
)
from pipeline.models.dit import DIT_PRESETS, DiT
from pipeline.models.unet import UNET_PRESETS, UNet1d

TINY_UNET = DIFFUSION_PRESETS["tiny-unet"]  # the sa1 architecture (U-Net, per-second timing) at the tiny size


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and the suite shares 2 cores with other jobs (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("preset", "paper_millions"), [("sa1", 906.7), ("sa-open", 1056.8)])
def test_paper_parameter_counts(preset: str, paper_millions: float) -> None:
    """What is counted: the whole ConditionedDiffusionModel, i.e. the backbone (U-Net / DiT) plus the two timing
    conditioners (plus SA 1.0's learned null-conditioning sequence); the CLAP/T5 text encoder and the VAE are not
    part of it. The conditioners are < 0.1% of either model, so the backbones alone also pass."""
    with torch.device("meta"):
        model = build_diffusion_model(preset)
    total, backbone = n_params(model), n_params(model.backbone)
    assert total == pytest.approx(paper_millions * 1e6, rel=0.02)
    assert backbone == pytest.approx(paper_millions * 1e6, rel=0.02)
    assert (total - backbone) / total < 1e-3


def _inputs(B: int, C: int, T: int, L: int, D_tok: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, C, T, generator=g), torch.rand(B, generator=g)
    tokens = torch.randn(B, L, D_tok, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, L // 2 :] = False  # a short prompt in the batch
    return x, t, tokens, mask


@pytest.mark.parametrize("T", [32, 30])
def test_unet_shapes_any_length(T: int) -> None:
    cfg = UNET_PRESETS["tiny"]
    net = UNet1d(cfg).eval()
    x, t, tokens, mask = _inputs(2, cfg.in_channels, T, 6, cfg.context_dim)
    with torch.no_grad():
        v = net(x, t, tokens, mask)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_dit_shapes_and_identity_at_init() -> None:
    cfg = DIT_PRESETS["tiny"]
    net = DiT(cfg).eval()
    x, t, tokens, mask = _inputs(2, cfg.io_channels, 20, 6, cfg.cond_token_dim)
    g = torch.randn(2, cfg.global_cond_dim)
    with torch.no_grad():
        v = net(x, t, tokens, mask, g)
        # zero-initialised branches: every block is the identity, so v = project_out(project_in(x)) at init
        expected = net.project_out(net.project_in(x.transpose(1, 2))).transpose(1, 2)
    assert v.shape == x.shape
    torch.testing.assert_close(v, expected)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_padded_text_tokens_are_masked(backbone: str) -> None:
    """Changing the tokens under a False mask must not change v (and a fully masked row must not give NaNs)."""
    torch.manual_seed(0)
    if backbone == "unet":
        net, C, Dt = UNet1d(UNET_PRESETS["tiny"]).eval(), 64, 64
    else:
        net, C, Dt = DiT(DIT_PRESETS["tiny"]).eval(), 64, 64
        for p in net.parameters():  # leave the zero-initialised state, where cross-attention does nothing
            torch.nn.init.normal_(p, std=0.1)
    x, t, tokens, mask = _inputs(2, C, 16, 6, Dt)
    g = torch.randn(2, 128) if backbone == "dit" else None
    other = tokens.clone()
    other[~mask] = 100.0
    with torch.no_grad():
        a, b = net(x, t, tokens, mask, g), net(x, t, other, mask, g)
        c = net(x, t, other, None, g)
        empty = net(x, t, tokens, torch.zeros_like(mask), g)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # without the mask the padding is seen
    assert torch.isfinite(empty).all()


def test_timing_conditioners() -> None:
    emb = TimingConditioner("embedding", 8, max_seconds=512)
    out = emb(torch.tensor([3.0, 3.7, 600.0, 512.0, -2.0, 0.0]))
    assert out.shape == (6, 1, 8)
    torch.testing.assert_close(out[0], out[1])  # per integer second (floor)
    torch.testing.assert_close(out[2], out[3])  # clamped at 512
    torch.testing.assert_close(out[4], out[5])  # and at 0
    fourier = TimingConditioner("fourier", 8, max_seconds=512)
    out = fourier(torch.tensor([3.0, 3.7, 600.0, 512.0]))
    assert out.shape == (4, 1, 8) and not torch.allclose(out[0], out[1])  # continuous in seconds
    torch.testing.assert_close(out[2], out[3])
    with pytest.raises(ValueError, match="timing kind"):
        TimingConditioner("sinusoid", 8)


@pytest.mark.parametrize("config", [DIFFUSION_PRESETS["tiny"], TINY_UNET], ids=["tiny-dit", "tiny-unet"])
def test_conditioning_layout_and_cfg_dropout(config: DiffusionModelConfig) -> None:
    torch.manual_seed(0)
    model = ConditionedDiffusionModel(config).eval()
    for p in model.backbone.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, text, mask = _inputs(3, 64, 16, 5, 64)
    start, total = torch.tensor([0.0, 10.0, 30.0]), torch.tensor([30.0, 60.0, 95.0])
    tokens, tmask, global_cond = model.conditioning(text, mask, start, total)
    assert tokens.shape == (3, 7, 64) and tmask.shape == (3, 7) and bool(tmask[:, -2:].all())
    torch.testing.assert_close(tokens[:, :5], text)  # text first, then start, then total
    torch.testing.assert_close(tokens[:, 5:6], model.seconds_start(start))
    assert (global_cond is None) == (not config.timing_global)
    with torch.no_grad():
        cond = model(x, t, text, mask, start, total)
        uncond = model(x, t, text, mask, start, total, uncond=True)
        none_dropped = model(x, t, text, mask, start, total, cfg_dropout=0.0)
        all_dropped = model(x, t, text, mask, start, total, cfg_dropout=1.0)
        # the null branch ignores the prompt entirely
        uncond_other_text = model(x, t, torch.randn_like(text), torch.ones_like(mask), start, total, uncond=True)
        guided_1 = guided_model_fn(model, text, mask, start, total, cfg_scale=1.0)(x, t)
        guided_3 = guided_model_fn(model, text, mask, start, total, cfg_scale=3.0)(x, t)
    torch.testing.assert_close(none_dropped, cond)
    torch.testing.assert_close(all_dropped, uncond)
    torch.testing.assert_close(uncond_other_text, uncond)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided_1, cond)
    torch.testing.assert_close(guided_3, uncond + 3.0 * (cond - uncond))
    # dropout is per sample: with p = 0.5 and a fixed generator, some samples are dropped and some are not
    g = torch.Generator().manual_seed(3)
    x8 = x.repeat(4, 1, 1)
    args8 = (t.repeat(4), text.repeat(4, 1, 1), mask.repeat(4, 1), start.repeat(4), total.repeat(4))
    with torch.no_grad():
        mixed = model(x8, *args8, cfg_dropout=0.5, generator=g)
        c8, u8 = model(x8, *args8), model(x8, *args8, uncond=True)
    is_c = [torch.allclose(mixed[i], c8[i]) for i in range(12)]
    is_u = [torch.allclose(mixed[i], u8[i]) for i in range(12)]
    assert all(a != b for a, b in zip(is_c, is_u, strict=True)) and any(is_c) and any(is_u)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="backbone"):
        DiffusionModelConfig(backbone="transformer")
    with pytest.raises(ValueError, match="unet is required"):
        DiffusionModelConfig(backbone="unet")
    with pytest.raises(ValueError, match="expected"):
        dataclasses.replace(DIFFUSION_PRESETS["tiny"], io_channels=16)
    with pytest.raises(ValueError, match="unknown diffusion preset"):
        build_diffusion_model("sa2")
    model = build_diffusion_model("tiny")
    too_long = model.cfg.max_text_tokens + 1
    with pytest.raises(ValueError, match="at most"):
        model.conditioning(
            torch.zeros(1, too_long, 64), torch.ones(1, too_long, dtype=torch.bool), torch.zeros(1), torch.zeros(1)
        )


@pytest.mark.parametrize("config", [DIFFUSION_PRESETS["tiny"], TINY_UNET], ids=["tiny-dit", "tiny-unet"])
def test_tiny_model_overfits_one_batch(config: DiffusionModelConfig) -> None:
    """Memorising one (x0, noise, t, conditioning) batch: the v-loss must fall 10x within 40 Adam steps."""
    torch.manual_seed(0)
    model = ConditionedDiffusionModel(config)
    g = torch.Generator().manual_seed(0)
    B, T, L = 4, 32, 8
    x0, noise = torch.randn(B, 64, T, generator=g), torch.randn(B, 64, T, generator=g)
    t = torch.rand(B, generator=g)
    text, mask = torch.randn(B, L, 64, generator=g), torch.ones(B, L, dtype=torch.bool)
    start, total = torch.tensor([0.0, 3.0, 10.0, 50.0]), torch.tensor([30.0, 40.0, 60.0, 95.0])

    def model_fn(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return model(x_t, tt, text, mask, start, total)

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = D.v_loss(model_fn, x0, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses


def test_timing_frames_mark_the_requested_length_and_reach_the_dit() -> None:
    """The tiny preset's per-frame timing channel: 1 on the frames that start inside [0, total - start) seconds, 0
    after; it goes into the DiT as an input channel, so only the frames whose mark changes see a different input."""
    model = build_diffusion_model("tiny").eval()
    rate = model.cfg.timing_frame_rate
    assert rate == 44100 / 1024 and model.backbone.cfg.input_concat_dim == 1
    frames = model.timing_frames(torch.tensor([0.0, 10.0, 0.0, 5.0]), torch.tensor([3.0, 12.0, 8.0, 4.0]), 345)
    assert frames.shape == (4, 1, 345)
    # 3 s = 132300 samples = 129.2 latent frames of 1024 samples: 130 frames hold audio (the crop's mask agrees)
    assert frames[:, 0].sum(-1).tolist() == [130.0, 87.0, 345.0, 0.0]
    assert frames[0, 0, :130].all() and not frames[0, 0, 130:].any()
    # the channel reaches the network: with its projection set, 3 s and 8 s differ from frame 130 on
    torch.manual_seed(0)
    for p in model.backbone.parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.nn.init.zeros_(model.seconds_total.proj.weight)  # the timing token and global vector ignore the total
    torch.nn.init.zeros_(model.seconds_total.proj.bias)
    x, t, text, mask = _inputs(1, 64, 200, 5, 64)
    with torch.no_grad():
        three, eight = (model(x, t, text, mask, torch.zeros(1), torch.tensor([s])) for s in (3.0, 8.0))
    assert not torch.allclose(three, eight)
    # self-attention mixes frames, so the change spreads; the first frames' inputs are the same either way
    with torch.no_grad():
        h3, h8 = (
            model.backbone.preprocess_conv(
                torch.cat([x, model.timing_frames(torch.zeros(1), torch.tensor([s]), 200)], 1)
            )
            for s in (3.0, 8.0)
        )
    torch.testing.assert_close(h3[..., :130], h8[..., :130])
    assert not torch.allclose(h3[..., 130:], h8[..., 130:])
    with pytest.raises(ValueError, match="input_concat"):
        model.backbone(x, t, text, mask, torch.zeros(1, 128))  # the tiny DiT needs its frame channel
    with pytest.raises(ValueError, match="timing_frame_rate"):
        dataclasses.replace(TINY_UNET, timing_frame_rate=10.0)  # a DiT input channel: dit backbone only
    with pytest.raises(ValueError, match="input_concat_dim"):
        dataclasses.replace(DIFFUSION_PRESETS["tiny"], timing_frame_rate=0.0)
