"""`train diffusion`: the v-objective on VAE latents, conditioned on a frozen CLAP's penultimate text layer and timing.

    crop (B, C, W), mask (B, W), caption, seconds_start, seconds_total
      caption ─tokenizer→ ids ─frozen CLAP text encoder (penultimate layer)→ tokens (B, L, D)
      t ~ U[0, 1), noise ~ N(0, I):  loss = ‖ v_θ(x_t, t | tokens, timing; CFG dropout) − v_target ‖² over every frame

The loss covers the padding too: a file shorter than the window is followed by the VAE's latent of silence, and
learning to produce that silence after ``seconds_total`` is how the model learns to end on time (Stable Audio §3.3;
a loss masked to the real frames never sees the end and fills the whole window).

Every ``run.demo_every`` steps rank 0 samples each demo prompt at each ``demo_seconds`` value with the EMA weights,
decodes with the frozen VAE, trims to the requested length (as generation does) and logs a wav and a spectrogram.
With ``data.holdout_split`` set, every checkpoint also generates the held-out captions at ``holdout_seconds`` and
logs timing error (raw window, as evaluation measures it) and the CLAP score of matched vs shuffled prompt/audio.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import shards as shard_format
from pipeline.config import TrainConfig
from pipeline.diffusion import sample, sample_t, v_loss
from pipeline.generate import load_clap, write_wav
from pipeline.metrics import matched_and_shuffled, nonsilent_seconds
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.clap import CLAP
from pipeline.models.conditioning import build_diffusion_model, guided_model_fn
from pipeline.text import CaptionTokenizer
from pipeline.tracking import Tracker
from train import data
from train.components import CONFIG_FILE, WEIGHTS_FILE, copy_export, load_vae, save_weights, vae_uri
from train.engine import Engine
from train.loop import RankContext, Task, run

log = logging.getLogger(__name__)

DEMO_STEPS = 25  # sampler steps for demos: enough to hear the model, cheap next to training
DEMO_CFG_SCALE = 6.0


def build_task(cfg: TrainConfig, ctx: RankContext, restore: Path | None) -> Task:
    if not cfg.model.clap:
        raise ValueError("model.clap: a trained CLAP (path, s3:// or models:/NAME@ALIAS) is required for diffusion")
    index = shard_format.read_index(cfg.data.shards)
    urls = shard_format.shard_uris(cfg.data.shards, cfg.data.split)
    if not urls:
        raise ValueError(f"data.shards: no {cfg.data.split!r} shards under {cfg.data.shards}")
    rate = float(index["latent_rate"])
    window = max(1, round(cfg.data.window_seconds * rate))
    vae = load_vae(vae_uri(cfg.model.vae, index))
    if vae.latent_channels != int(index["latent_channels"]):
        raise ValueError(f"model.vae: {vae.latent_channels}-ch latents, the shards have {index['latent_channels']}")
    silence = data.silence_latent(vae)
    try:
        clap, tokenizer, _ = load_clap(cfg.model.clap)
    except ValueError as err:  # not a CLAP export: name the config key
        raise ValueError(f"model.clap: {err}") from err
    max_tokens = clap.config.text.max_tokens

    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_diffusion_model(cfg.model.preset)
    engine = Engine(model, cfg, ctx.rank, ctx.world_size)

    def text_tokens(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenizer.encode_batch(captions, max_length=max_tokens)
        with torch.no_grad():
            return clap.text_conditioning(torch.from_numpy(ids), torch.from_numpy(mask))

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, tmask = text_tokens(batch["caption"])  # (B, L, D), (B, L)
        return diffusion_loss(engine, batch, tokens, tmask, cfg.cfg_dropout, engine.dtype), {}

    holdout = data.holdout(cfg, window, rate, silence)

    def evaluate(step: int) -> dict[str, float]:
        weights = engine.export_state_dict()  # the EMA weights the export holds; collective: every rank calls it
        if not ctx.is_main or holdout is None:
            return {}
        model = build_diffusion_model(cfg.model.preset)
        model.load_state_dict(weights, strict=False)
        return holdout_generation(model.eval(), vae, clap, tokenizer, holdout["caption"], cfg, window, rate)

    def demo(step: int, tracker: Tracker) -> None:
        weights = engine.ema_state_dict()
        if weights is None or not tracker.enabled:
            return
        ema_model = build_diffusion_model(cfg.model.preset)
        ema_model.load_state_dict(weights, strict=False)
        with tempfile.TemporaryDirectory(prefix="longplay-demo-") as tmp:
            for path in render_demos(ema_model.eval(), vae, text_tokens, cfg, window, rate, Path(tmp)):
                tracker.log_artifact(path, artifact_path=f"demo/step_{step:08d}")

    def export(weights: dict[str, torch.Tensor], directory: Path) -> None:
        save_weights(weights, directory / WEIGHTS_FILE)
        config = {
            "kind": "diffusion",
            "preset": cfg.model.preset,
            "latent_rate": rate,
            "latent_channels": vae.latent_channels,
            "window_seconds": cfg.data.window_seconds,
            "clap": cfg.model.clap,
            "vae": vae_uri(cfg.model.vae, index),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        copy_export(cfg.model.clap, directory / "clap")
        vae.save_pretrained(directory / "autoencoder")

    return Task(
        name="diffusion",
        engine=engine,
        batches=data.batches_from(cfg, urls, window, rate, silence, ctx.rank, ctx.world_size),
        loss_fn=loss_fn,
        export=export,
        demo=demo,
        evaluate=evaluate if holdout is not None else None,
        tags={"clap_uri": cfg.model.clap},
    )


def diffusion_loss(
    model: Any,
    batch: dict[str, Any],
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    cfg_dropout: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The v-objective on a batch of crops (x (B, C, W), seconds_start/total (B,)) with text tokens (B, L, D).

    Every frame counts, the silence padding after short files included: that is what teaches the model to end on
    time. ``model`` is a ConditionedDiffusionModel or the DeepSpeed engine around one."""
    x0 = batch["x"].to(dtype)  # (B, C, W)
    t = sample_t(x0.shape[0]).to(dtype)
    noise = torch.randn_like(x0)

    def model_fn(x_t: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        start, total = batch["seconds_start"], batch["seconds_total"]
        return model(x_t, t_, tokens.to(dtype), token_mask, start, total, cfg_dropout=cfg_dropout)

    return v_loss(model_fn, x0, t, noise)


HOLDOUT_GENERATIONS = 8  # held-out captions generated at each checkpoint


@torch.no_grad()
def holdout_generation(
    model: torch.nn.Module,
    vae: Autoencoder,
    clap: CLAP,
    tokenizer: CaptionTokenizer,
    captions: list[str],
    cfg: TrainConfig,
    window: int,
    rate: float,
) -> dict[str, float]:
    """Generate up to :data:`HOLDOUT_GENERATIONS` held-out captions at ``cfg.holdout_seconds`` (cycled) in one
    batch of full windows and measure what a user cares about:

    - timing: the decoded raw window's non-silent length (last 0.1 s frame above −40 dB re peak, as ``longplay
      evaluate`` measures it) against the requested ``seconds_total`` = ceil(seconds);
    - prompt adherence: the CLAP score (cosine of text and audio embeddings; audio embedded from the generated
      latents, masked to the requested length) of matched pairs, and of every mismatched pair as the baseline.
    """
    captions = captions[:HOLDOUT_GENERATIONS]
    n = len(captions)
    requested = [float(np.ceil(cfg.holdout_seconds[i % len(cfg.holdout_seconds)])) for i in range(n)]
    ids, mask = (torch.from_numpy(a) for a in tokenizer.encode_batch(captions, max_length=clap.config.text.max_tokens))
    tokens, tmask = clap.text_conditioning(ids, mask)
    fn = guided_model_fn(model, tokens, tmask, torch.zeros(n), torch.tensor(requested), DEMO_CFG_SCALE)
    latents = sample(fn, (n, vae.latent_channels, window), steps=DEMO_STEPS, seed=cfg.run.seed)  # (n, C, W)
    audio = vae.decode(latents).clamp(-1, 1).float().numpy()  # (n, 2, W·D)
    errors = [abs(nonsilent_seconds(a, vae.sample_rate) - s) for a, s in zip(audio, requested, strict=True)]
    frames = torch.arange(window)[None, :] < torch.tensor(requested)[:, None] * rate  # (n, W) requested frames
    matched, shuffled = matched_and_shuffled(
        clap.encode_text(ids, mask).numpy(), clap.encode_audio(latents, frames).numpy()
    )
    out = {
        "holdout_timing_median_abs_error_s": float(np.median(errors)),
        "holdout_timing_within_1s": float(np.mean([e <= 1.0 for e in errors])),
        "holdout_clap_score_matched": matched,
    }
    if shuffled is not None:
        out["holdout_clap_score_shuffled"] = shuffled
    return out


@torch.no_grad()
def render_demos(
    model: torch.nn.Module,
    vae: Autoencoder,
    text_tokens: Any,
    cfg: TrainConfig,
    window: int,
    rate: float,
    out: Path,
) -> list[Path]:
    """Sample every (prompt, seconds) pair, decode, trim; write ``pNN_Ss.wav`` and ``pNN_Ss.png`` into ``out``."""
    paths = []
    for p, prompt in enumerate(cfg.demo_prompts):
        for seconds in cfg.demo_seconds:
            tokens, tmask = text_tokens([prompt])
            frames = max(window, int(np.ceil(seconds * rate)))
            fn = guided_model_fn(
                model, tokens, tmask, torch.zeros(1), torch.tensor([float(np.ceil(seconds))]), DEMO_CFG_SCALE
            )
            latents = sample(fn, (1, vae.latent_channels, frames), steps=DEMO_STEPS, seed=cfg.run.seed + p)
            audio = vae.decode(latents)[0, :, : int(seconds * vae.sample_rate)].clamp(-1, 1).numpy()  # (2, N)
            stem = out / f"p{p:02d}_{seconds:g}s"
            paths += [write_wav(stem.with_suffix(".wav"), audio, vae.sample_rate)]
            paths += [write_spectrogram(stem.with_suffix(".png"), audio, vae.sample_rate, f"{prompt} ({seconds:g} s)")]
    return paths


def write_spectrogram(path: Path, audio: np.ndarray, sample_rate: int, title: str) -> Path:
    """Log-magnitude STFT of the channel mean as a PNG (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mono = torch.from_numpy(audio.mean(axis=0))
    spec = torch.stft(mono, n_fft=1024, hop_length=256, window=torch.hann_window(1024), return_complex=True)
    db = 20 * torch.log10(spec.abs().clamp_min(1e-5))  # (freq, frames)
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    seconds = audio.shape[-1] / sample_rate
    ax.imshow(db.numpy(), origin="lower", aspect="auto", extent=(0, seconds, 0, sample_rate / 2000), vmin=-100)
    ax.set(xlabel="s", ylabel="kHz", title=title[:60])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def train(cfg: TrainConfig, ctx: RankContext, restore: Path | None) -> dict[str, Any]:
    return run(build_task(cfg, ctx, restore), cfg, ctx, restore)
