"""Models that learn, at a size CI can afford: small single-process replays of the tiny recipes on real music.

These guard the two failures a user would meet first: a VAE whose output does not depend on its input (the tiny
preset with conv biases collapsed to a DC offset and decoded silence and music alike), and a diffusion model that
never ends on time (a loss masked to the real frames never sees the silence after ``seconds_total``).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.config import TrainConfig, load_config
from pipeline.diffusion import sample
from pipeline.models.autoencoder import build_autoencoder
from pipeline.models.conditioning import DIFFUSION_PRESETS, ConditionedDiffusionModel, guided_model_fn
from pipeline.reconstruction import reconstruction_metrics
from train.diffusion import diffusion_loss
from train.vae_losses import reconstruction_loss

REPO = Path(__file__).resolve().parents[2]
SR = 44100


@pytest.fixture(autouse=True)
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _pieces(root: Path) -> list[np.ndarray]:
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines() if line]
    return [sf.read(root / r["path"], dtype="float32", always_2d=True)[0].T.copy() for r in rows]  # (2, N) each


def _crop(x: np.ndarray, n: int, rng: random.Random | None) -> np.ndarray:
    start = 0 if rng is None else rng.randint(0, max(0, x.shape[1] - n))
    part = x[:, start : start + n]
    return np.pad(part, ((0, 0), (0, n - part.shape[1])))


def test_tiny_vae_learns_real_music_and_keeps_silence_silent(demo_music) -> None:
    """The tiny preset with the tiny recipe (configs/tiny/vae.yaml: lr, KL weight, STFT floor, the waveform term,
    decoding the posterior mean) on 1/2 s crops of real music: held-out spectral convergence falls well under 1 (a
    silent decoder scores exactly 1; the preset with conv biases stayed at 1.02-1.03 here, the STFT-only recipe with
    posterior draws at 0.86 with 16 channels), the waveform error under 1 (phase-blind losses never get there: the
    decoder must follow the waveform, not only its spectrum), and digital silence decodes far below music."""
    cfg = load_config(TrainConfig, REPO / "configs" / "tiny" / "vae.yaml", ["data.shards=unused"])
    pieces = _pieces(demo_music)
    train, held = pieces[:-2], pieces[-2:]
    excerpts = torch.from_numpy(np.stack([_crop(x, 2 * SR, None) for x in held]))  # (2, 2, 2 s)
    torch.manual_seed(0)
    vae = build_autoencoder("tiny")
    before = reconstruction_metrics(vae, excerpts)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.deepspeed.lr, betas=cfg.deepspeed.betas)
    rng = random.Random(0)
    for _ in range(STEPS_VAE):
        audio = torch.from_numpy(np.stack([_crop(rng.choice(train), SR // 2, rng) for _ in range(4)]))
        recon, kl = vae(audio, sample=cfg.vae.sample_posterior)
        loss = reconstruction_loss(recon, audio, cfg.vae)[0] + cfg.vae.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.deepspeed.grad_clip)
        opt.step()
    after = reconstruction_metrics(vae, excerpts)
    print("tiny VAE before", before, "after", after)
    assert before["vae_spectral_convergence"] == pytest.approx(1.0, abs=0.05)  # at init the output is ~silent
    assert after["vae_spectral_convergence"] < 0.85, after
    assert after["vae_waveform_error"] < 0.95, after
    assert after["vae_log_mel_distance"] < 0.6 * before["vae_log_mel_distance"], after
    assert after["vae_silence_below_music_db"] > 40.0, after


STEPS_VAE = 80


def test_diffusion_learns_to_end_on_time() -> None:
    """Latents of "music" (structured, unit variance) for seconds_total, then the silence latent (zeros) up to the
    window: trained with the loop's loss, the tiny DiT leaves the frames after the requested length near silent,
    and fills the frames before it."""
    rate, window = 10.0, 40  # latent frames per second, 4 s windows
    torch.manual_seed(0)
    # the tiny preset, its per-frame timing channel counting frames at this test's rate
    model = ConditionedDiffusionModel(dataclasses.replace(DIFFUSION_PRESETS["tiny"], timing_frame_rate=rate))
    channels, token_dim = model.cfg.io_channels, model.cfg.cond_token_dim
    pattern = torch.randn(channels, window)

    def batch(size: int) -> dict[str, torch.Tensor]:
        seconds = torch.randint(1, 5, (size,)).float()  # 1-4 s of content
        frames = torch.arange(window)[None, :] < seconds[:, None] * rate  # (B, W)
        shift = torch.randint(0, window, (size,))
        x = torch.stack([torch.roll(pattern, int(s), dims=1) for s in shift]) + 0.3 * torch.randn(
            size, channels, window
        )
        x = x * frames[:, None, :]
        return {"x": x, "seconds_start": torch.zeros(size), "seconds_total": seconds}

    tokens, token_mask = torch.zeros(8, 1, token_dim), torch.ones(8, 1, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(STEPS_DIFFUSION):
        loss = diffusion_loss(model, batch(8), tokens, token_mask, cfg_dropout=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.eval()
    requested = torch.tensor([1.0, 2.0, 3.0, 2.0])
    fn = guided_model_fn(model, tokens[:4], token_mask[:4], torch.zeros(4), requested, cfg_scale=1.0)
    with torch.no_grad():
        latents = sample(fn, (4, channels, window), steps=25, seed=0)  # (4, C, W)
    for z, seconds in zip(latents, requested.tolist(), strict=True):
        end = int(seconds * rate)
        inside = float(z[:, : end - 2].square().mean().sqrt())
        after = float(z[:, end + 2 :].square().mean().sqrt())
        # Measured at 1500 steps: inside 0.30-0.78, after 0.024-0.026; with the loss masked to the real frames (the
        # loop before this fix) after stayed at 0.65-0.86, as loud as the music.
        assert inside > 0.2, (seconds, inside)
        assert after < 0.1 and after < 0.25 * inside, (seconds, inside, after)


STEPS_DIFFUSION = 1500
