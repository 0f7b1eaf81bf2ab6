"""How well an autoencoder reconstructs held-out audio: the figures a user watches to know a VAE run is learning.

All functions take float tensors ``reference`` and ``reconstruction`` of the same shape (B, 2, N) at 44.1 kHz.

    spectral_convergence   ‖ |S(x)| − |S(x̂)| ‖_F / ‖ |S(x)| ‖_F, Hann windows of 512/1024/2048, hop n/4, averaged
                           over the three sizes (per-channel spectrograms stacked). Phase-blind, like the STFT
                           losses: a decoder that outputs silence scores exactly 1, a perfect one 0.
    log_mel_distance       mean |log mel(x) − log mel(x̂)| (64 HTK bands, n_fft 2048, hop 512), natural log of power
                           floored at 1e-5 (−50 dB) so inaudible bins do not dominate.
    waveform_error         ‖x̂ − x‖ / ‖x‖: phase-sensitive; ≥ 1 for phase-blind training, reported beside the rest.
    envelope_correlation   Pearson correlation of the 50 ms RMS envelopes (does the loudness follow the input?).
    log_spectrogram_corr   Pearson correlation of the log-magnitude spectrograms (n_fft 1024).
    silence_below_music_db how far below a music decode digital silence decodes (RMS, dB): silence must decode to
                           silence for the timing mechanism to show where a generation ends.
"""

from __future__ import annotations

import numpy as np
import torch

SC_SIZES = (512, 1024, 2048)
MEL_BANDS, MEL_FFT, MEL_HOP = 64, 2048, 512
ENVELOPE_SECONDS = 0.05


def _magnitude(audio: torch.Tensor, n_fft: int, hop: int | None = None) -> torch.Tensor:
    """(B, C, N) → |STFT| (B·C, F, frames), Hann window, hop n_fft / 4 unless given."""
    window = torch.hann_window(n_fft, dtype=audio.dtype, device=audio.device)
    spec = torch.stft(audio.flatten(0, 1), n_fft, hop_length=hop or n_fft // 4, window=window, return_complex=True)
    return spec.abs()


def spectral_convergence(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Multi-resolution spectral convergence over the whole batch (see the module docstring)."""
    values = []
    for n_fft in SC_SIZES:
        s, s_hat = _magnitude(reference, n_fft), _magnitude(reconstruction, n_fft)
        values.append(float(torch.linalg.norm(s - s_hat) / torch.linalg.norm(s).clamp_min(1e-12)))
    return float(np.mean(values))


def log_mel_distance(reference: torch.Tensor, reconstruction: torch.Tensor, sample_rate: int = 44100) -> float:
    from pipeline.embedders import mel_filterbank

    bank = torch.from_numpy(mel_filterbank(sample_rate, MEL_FFT, MEL_BANDS)).to(reference.dtype)

    def log_mel(audio: torch.Tensor) -> torch.Tensor:
        return torch.log((bank @ _magnitude(audio, MEL_FFT, MEL_HOP).square()).clamp_min(1e-5))

    return float((log_mel(reference) - log_mel(reconstruction)).abs().mean())


def waveform_error(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    return float(torch.linalg.norm(reconstruction - reference) / torch.linalg.norm(reference).clamp_min(1e-12))


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(torch.linalg.norm(a) * torch.linalg.norm(b))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def envelope_correlation(reference: torch.Tensor, reconstruction: torch.Tensor, sample_rate: int = 44100) -> float:
    hop = max(1, round(ENVELOPE_SECONDS * sample_rate))

    def envelope(audio: torch.Tensor) -> torch.Tensor:  # (B, frames): RMS over channels and each 50 ms frame
        frames = audio[..., : audio.shape[-1] // hop * hop].reshape(*audio.shape[:2], -1, hop)
        return frames.square().mean(dim=(1, 3)).sqrt()

    return _pearson(envelope(reference), envelope(reconstruction))


def log_spectrogram_correlation(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    floor = 1e-5
    return _pearson(
        _magnitude(reference, 1024).clamp_min(floor).log(), _magnitude(reconstruction, 1024).clamp_min(floor).log()
    )


def rms_db(audio: torch.Tensor) -> float:
    """RMS level in dB re full scale; −inf dB is reported as −300."""
    rms = float(audio.double().square().mean().sqrt())
    return 20 * np.log10(rms) if rms > 0 else -300.0


@torch.no_grad()
def reconstruction_metrics(vae: torch.nn.Module, excerpts: torch.Tensor) -> dict[str, float]:
    """Encode (posterior mean) and decode ``excerpts`` (B, 2, N) and score the result; also decode digital silence of
    the same shape. Returns the ``vae_*`` metrics a training run logs at every checkpoint."""
    vae.eval()
    recon = vae.decode(vae.encode(excerpts))[..., : excerpts.shape[-1]].float()
    silence = vae.decode(vae.encode(torch.zeros_like(excerpts)))[..., : excerpts.shape[-1]].float()
    x = excerpts.float()
    return {
        "vae_spectral_convergence": spectral_convergence(x, recon),
        "vae_log_mel_distance": log_mel_distance(x, recon, int(vae.sample_rate)),
        "vae_waveform_error": waveform_error(x, recon),
        "vae_envelope_correlation": envelope_correlation(x, recon, int(vae.sample_rate)),
        "vae_log_spectrogram_correlation": log_spectrogram_correlation(x, recon),
        "vae_silence_below_music_db": float(min(300.0, rms_db(recon) - rms_db(silence))),
    }
