"""The autoencoder's reconstruction terms and the posterior switch the VAE loop uses (train/vae.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import VaeLossSection
from pipeline.models.autoencoder import build_autoencoder
from train.vae_losses import reconstruction_loss, stereo_stft_loss, waveform_loss


def _audio(seed: int, n: int = 4096) -> torch.Tensor:
    return 0.3 * torch.randn(2, 2, n, generator=torch.Generator().manual_seed(seed))


def test_waveform_loss_is_the_relative_squared_error() -> None:
    x = _audio(0)
    assert waveform_loss(x, x).item() == 0.0
    assert waveform_loss(torch.zeros_like(x), x).item() == pytest.approx(1.0)  # silence scores exactly 1
    assert waveform_loss(0.5 * x, x).item() == pytest.approx(0.25)
    assert waveform_loss(-x, x).item() == pytest.approx(4.0)  # phase-blind STFT terms score this as perfect
    assert stereo_stft_loss(-x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_reconstruction_loss_adds_the_waveform_term_only_when_weighted() -> None:
    pred, target = _audio(1), _audio(2)
    stft = stereo_stft_loss(pred, target, floor=1e-2).item()
    paper = VaeLossSection(magnitude_floor=1e-2)  # waveform_weight 0: the paper's recipe
    loss, metrics = reconstruction_loss(pred, target, paper)
    assert loss.item() == pytest.approx(stft) and metrics == {"stft": pytest.approx(stft)}
    loss, metrics = reconstruction_loss(pred, target, VaeLossSection(magnitude_floor=1e-2, waveform_weight=2.0))
    wave = waveform_loss(pred, target).item()
    assert metrics == {"stft": pytest.approx(stft), "waveform": pytest.approx(wave)}
    assert loss.item() == pytest.approx(stft + 2.0 * wave)


def test_training_pass_decodes_a_draw_or_the_posterior_mean() -> None:
    torch.manual_seed(0)
    vae = build_autoencoder("tiny").eval()
    x = _audio(3, 3000)
    with torch.no_grad():
        mean_a, kl_a = vae(x, sample=False)
        mean_b, kl_b = vae(x, generator=torch.Generator().manual_seed(1), sample=False)
        draw_a, _ = vae(x, generator=torch.Generator().manual_seed(1))
        draw_b, _ = vae(x, generator=torch.Generator().manual_seed(2))
        expected = vae.decode(vae.encode(x))[..., : x.shape[-1]]
    assert mean_a.shape == draw_a.shape == x.shape
    torch.testing.assert_close(mean_a, expected, rtol=0, atol=0)  # the mean: no randomness at all
    torch.testing.assert_close(mean_b, expected, rtol=0, atol=0)
    assert kl_a.item() == kl_b.item() > 0  # the KL term is the same either way
    assert (draw_a - draw_b).abs().max() > 1e-4 and (draw_a - expected).abs().max() > 1e-4
