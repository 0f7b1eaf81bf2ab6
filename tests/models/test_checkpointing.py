"""Activation checkpointing and batched CFG change nothing but memory and speed (issue 13).

Tolerances: checkpointing recomputes the same fp32 operations in the same order, so loss and gradients agree to
1e-6 relative (measured: bit-identical here); batched CFG runs the two branches as one batch of twice the size, where
a matmul may sum in another order, so v (of order 1) agrees to 1e-5 absolute + 1e-5 relative (measured: up to
3e-6 absolute on the tiny U-Net at CFG 7, which amplifies the difference of the branches by 7), and a whole 8-step
sampling run to 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import sample, v_loss
from pipeline.models import attention
from pipeline.models.conditioning import DIFFUSION_PRESETS, build_diffusion_model, guided_model_fn


@pytest.fixture(params=["tiny", "tiny-unet"])
def preset(request):
    """The tiny DiT and the tiny U-Net (the sa1 architecture at test size)."""
    return request.param


def _inputs(B: int = 3, T: int = 37, L: int = 5):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 64, T, generator=g)
    tokens = torch.randn(B, L, 64, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False  # a padded prompt
    start, total = torch.tensor([0.0, 2.0, 5.0])[:B], torch.tensor([4.0, 9.0, 30.0])[:B]
    return x0, tokens, mask, start, total, torch.rand(B, generator=g), torch.randn(B, 64, T, generator=g)


def _loss_and_grads(model, checkpointing: bool):
    x0, tokens, mask, start, total, t, noise = _inputs()
    model.backbone.cfg.activation_checkpointing = checkpointing
    model.zero_grad()
    loss = v_loss(lambda x_t, t_: model(x_t, t_, tokens, mask, start, total), x0, t, noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients(preset, monkeypatch):
    torch.manual_seed(0)
    model = build_diffusion_model(preset)
    for p in model.parameters():  # the DiT zero-initialises its residual outputs: make every gradient non-trivial
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    calls = []
    real = attention.checkpoint
    monkeypatch.setattr(attention, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, grads = _loss_and_grads(model, checkpointing=False)
    assert not calls
    loss_ckpt, grads_ckpt = _loss_and_grads(model, checkpointing=True)
    blocks = 2 if preset == "tiny" else 10  # DiT: 2 blocks; tiny U-Net: 7 residual + 3 transformer blocks
    assert len(calls) == blocks  # every block ran through torch.utils.checkpoint
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    used = {n for n, _ in model.named_parameters() if n != "null_tokens"}  # the null sequence is for CFG only
    assert grads_ckpt.keys() == grads.keys() == used
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-9, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_checkpointing_is_off_by_default_and_at_inference():
    model = build_diffusion_model("tiny")
    assert model.backbone.cfg.activation_checkpointing is False
    assert build_diffusion_model("tiny", activation_checkpointing=True).backbone.cfg.activation_checkpointing
    assert DIFFUSION_PRESETS["tiny"].dit.activation_checkpointing is False  # the preset itself is never changed


def test_batched_cfg_matches_two_calls(preset):
    torch.manual_seed(1)
    model = build_diffusion_model(preset).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    x, tokens, mask, start, total, t, _ = _inputs()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    with torch.no_grad():
        two = guided_model_fn(model, tokens, mask, start, total, cfg_scale=7.0, batched=False)(x, t)
        assert calls == [3, 3]
        one = guided_model_fn(model, tokens, mask, start, total, cfg_scale=7.0)(x, t)
        assert calls == [3, 3, 6]  # one forward of [cond; uncond]
    assert two.abs().max() > 0.1  # v of order 1: an absolute tolerance of 1e-5 is tight
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(two, guided_model_fn(model, tokens, mask, start, total, cfg_scale=1.0)(x, t))


def test_batched_cfg_samples_what_two_calls_sample():
    torch.manual_seed(2)
    model = build_diffusion_model("tiny").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    _, tokens, mask, start, total, _, _ = _inputs(B=1)
    out = {}
    for batched in (False, True):
        fn = guided_model_fn(model, tokens, mask, start, total, cfg_scale=6.0, batched=batched)
        out[batched] = sample(fn, (1, 64, 40), steps=8, seed=5)
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)


def test_the_training_config_keys_are_off_by_default():
    from pipeline.config import ModelSection

    assert ModelSection().activation_checkpointing is False and ModelSection().compile is False
    fields = ModelSection.model_fields
    assert "in backward" in fields["activation_checkpointing"].description
    assert "torch.compile" in fields["compile"].description
    model = build_diffusion_model("tiny", activation_checkpointing=True, compile_backbone=True)
    assert model.backbone.cfg.activation_checkpointing and model.backbone._compiled_call_impl is not None
    assert set(model.state_dict()) == set(build_diffusion_model("tiny").state_dict())  # names as exported


def test_every_attention_runs_through_sdpa(preset, monkeypatch):
    """Our attention is torch's scaled_dot_product_attention, which picks the flash / memory-efficient kernels on
    CUDA: every self- and cross-attention of a forward goes through it (DiT: 2 blocks x 2; U-Net: 3 blocks x 2)."""
    calls = []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    )
    model = build_diffusion_model(preset).eval()
    x, tokens, mask, start, total, t, _ = _inputs()
    with torch.no_grad():
        model(x, t, tokens, mask, start, total)
    assert len(calls) == (4 if preset == "tiny" else 6)
