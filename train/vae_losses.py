"""Losses of the autoencoder's adversarial training (Stable Audio §3.1, after DAC / EnCodec / stable-audio-tools).

reconstruction  multi-resolution STFT on mid = L + R and side = L − R, plus (half weight) on L and R; optionally
                a relative waveform error (vae.waveform_weight; 0 in the paper's recipe)
regulariser     KL of the VAE posterior (pipeline.models.autoencoder.vae_bottleneck), weight 1e-4
adversarial     multi-scale complex-STFT discriminator, hinge loss; feature matching on its activations
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import VaeLossSection
from pipeline.models.presets import PRESETS

STFT_SIZES = (2048, 1024, 512, 256, 128, 64, 32)  # reconstruction resolutions (hop = n_fft / 4)
DISC_SIZES = (2048, 1024, 512)  # discriminator resolutions
# Conv width of the discriminator per model preset. Its cost grows with width² at every STFT bin and frame, so the
# tiny preset (CPU tests, the demo) uses 8: width 32 costs ~30 s per step of 4 x 2 s on one CPU core, width 8 ~1 s.
DISC_WIDTH = {**dict.fromkeys(PRESETS, 32), "tiny": 8}
ADV_WEIGHT, FEATURE_WEIGHT = 0.1, 5.0  # the KL weight is a config key: vae.kl_weight (1e-4)
# Default floor of the STFT magnitudes before the log (auraloss / stable-audio-tools: sqrt(1e-8); the config key
# vae.magnitude_floor). Lower floors make the log term chase bins 140 dB down; the tiny recipe raises it to 1e-2 so
# the loss looks at what is audible (docs/architecture.md).
MAGNITUDE_FLOOR = 1e-4


def _magnitude(x: torch.Tensor, n_fft: int, floor: float) -> torch.Tensor:
    """(B, N) → |STFT| (B, F, frames), Hann window, hop n_fft / 4, floored at ``floor``."""
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop_length=n_fft // 4, window=window, return_complex=True)
    return spec.abs().clamp_min(floor)


def stft_loss(
    pred: torch.Tensor, target: torch.Tensor, sizes: tuple[int, ...] = STFT_SIZES, floor: float = MAGNITUDE_FLOOR
) -> torch.Tensor:
    """Spectral convergence + log-magnitude L1, averaged over resolutions. pred, target (B, N)."""
    total = pred.new_zeros(())
    used = [n for n in sizes if n <= pred.shape[-1]]
    for n_fft in used:
        p, t = _magnitude(pred, n_fft, floor), _magnitude(target, n_fft, floor)
        convergence = torch.linalg.norm(t - p) / torch.linalg.norm(t).clamp_min(1e-7)
        total = total + convergence + F.l1_loss(p.log(), t.log())
    return total / max(len(used), 1)


def stereo_stft_loss(pred: torch.Tensor, target: torch.Tensor, floor: float = MAGNITUDE_FLOOR) -> torch.Tensor:
    """pred, target (B, 2, N): mid/side at full weight, left/right at half (the paper's "sum and difference")."""
    mid = stft_loss(pred[:, 0] + pred[:, 1], target[:, 0] + target[:, 1], floor=floor)
    side = stft_loss(pred[:, 0] - pred[:, 1], target[:, 0] - target[:, 1], floor=floor)
    left_right = stft_loss(pred.flatten(0, 1), target.flatten(0, 1), floor=floor)
    return mid + side + 0.5 * left_right


def waveform_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred − target||² / ||target||² over the whole batch (B, 2, N): the phase-aware term of the tiny recipe.

    The STFT terms are blind to phase, and a small decoder trained on them alone learns the spectral envelope but
    not the partials; this term gives it the waveform to match (docs/architecture.md, "Models that learn")."""
    return (pred - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-8)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, recipe: VaeLossSection) -> tuple[torch.Tensor, dict]:
    """The recipe's reconstruction terms on (B, 2, N): stereo STFT at ``recipe.magnitude_floor``, plus
    ``recipe.waveform_weight`` · waveform when that is > 0. Returns (loss, {"stft": ..., ["waveform": ...]})."""
    stft = stereo_stft_loss(pred, target, floor=recipe.magnitude_floor)
    metrics = {"stft": float(stft.detach())}
    if not recipe.waveform_weight:
        return stft, metrics
    waveform = waveform_loss(pred, target)
    metrics["waveform"] = float(waveform.detach())
    return stft + recipe.waveform_weight * waveform, metrics


class STFTDiscriminatorScale(nn.Module):
    """One resolution: complex STFT (real and imaginary parts of each channel as image channels) → 2-D conv stack."""

    def __init__(self, n_fft: int, audio_channels: int = 2, width: int = 32) -> None:
        super().__init__()
        self.n_fft = n_fft
        c = 2 * audio_channels
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(c, width, (3, 9), padding=(1, 4)),
                nn.Conv2d(width, width, (3, 9), stride=(1, 2), padding=(1, 4)),
                nn.Conv2d(width, width, (3, 9), stride=(1, 2), padding=(1, 4)),
                nn.Conv2d(width, width, (3, 9), stride=(1, 2), padding=(1, 4)),
                nn.Conv2d(width, width, (3, 3), padding=(1, 1)),
            ]
        )
        self.out = nn.Conv2d(width, 1, (3, 3), padding=(1, 1))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        B, C, N = audio.shape
        window = torch.hann_window(self.n_fft, device=audio.device, dtype=audio.dtype)
        spec = torch.stft(audio.reshape(B * C, N), self.n_fft, self.n_fft // 4, window=window, return_complex=True)
        x = torch.view_as_real(spec).reshape(B, C, *spec.shape[1:], 2)  # (B, C, F, T, 2)
        x = x.permute(0, 1, 4, 3, 2).reshape(B, 2 * C, spec.shape[2], spec.shape[1])  # (B, 2C, T, F)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            features.append(x)
        return self.out(x), features


class STFTDiscriminator(nn.Module):
    """Several :class:`STFTDiscriminatorScale` at :data:`DISC_SIZES`; returns per-scale logits and features."""

    def __init__(self, audio_channels: int = 2, width: int = 32, sizes: tuple[int, ...] = DISC_SIZES) -> None:
        super().__init__()
        self.scales = nn.ModuleList(STFTDiscriminatorScale(n, audio_channels, width) for n in sizes)

    def forward(self, audio: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [scale(audio) for scale in self.scales]


def discriminator_hinge(real: list, fake: list) -> torch.Tensor:
    """mean relu(1 − D(x)) + mean relu(1 + D(x̂)), summed over scales."""
    return sum(F.relu(1 - r[0]).mean() + F.relu(1 + f[0]).mean() for r, f in zip(real, fake, strict=True))


def generator_hinge(fake: list) -> torch.Tensor:
    return sum(F.relu(1 - f[0]).mean() for f in fake)


def feature_matching(real: list, fake: list) -> torch.Tensor:
    """L1 between the discriminator's activations on real and reconstructed audio, relative to the real ones."""
    total = 0.0
    for (_, feats_r), (_, feats_f) in zip(real, fake, strict=True):
        for r, f in zip(feats_r, feats_f, strict=True):
            total = total + (r.detach() - f).abs().mean() / r.detach().abs().mean().clamp_min(1e-5)
    return total
