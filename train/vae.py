"""`train vae`: the autoencoder on audio shards (``KEY.flac``) with alternating discriminator / generator updates.

Each micro-step::

    audio (B, 2, N) ─VAE→ recon, kl
    discriminator:  hinge(D(audio), D(recon.detach()))                      → its own engine steps
    generator:      stereo STFT(recon, audio) [+ waveform_weight · waveform(recon, audio)] + kl_weight · kl
                    + 0.1 hinge_G(D(recon)) + 5 feature matching (D frozen for this pass) → the VAE's engine steps

With ``vae.adversarial=false`` there is no discriminator: the generator loss is STFT + KL alone (the demo's CPU
recipe: the discriminator triples the step cost, and the feature-matching term swamps reconstruction early on).
``vae.waveform_weight`` adds a waveform term, ``vae.sample_posterior=false`` decodes the posterior mean instead of a
draw, and ``vae.unit_latents`` folds a scale into the export so its latents have unit RMS. The paper's recipe leaves
all three off; the tiny recipe (configs/tiny/vae.yaml) turns them on (docs/architecture.md, "Models that learn").

The discriminator is a second DeepSpeed engine, checkpointed beside the VAE under ``discriminator/``. The export is
the VAE's EMA weights in the format ``pipeline.components.load_vae`` reads (model.safetensors + config.json). With
``data.holdout_split`` set, every checkpoint scores the EMA weights on held-out audio
(:func:`pipeline.reconstruction.reconstruction_metrics`: spectral convergence, log-mel distance, silence level...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline import shards as shard_format
from pipeline.components import save_vae
from pipeline.config import TrainConfig
from pipeline.models.autoencoder import Autoencoder, build_autoencoder
from pipeline.reconstruction import reconstruction_metrics
from train import data, loop
from train.components import CONFIG_FILE
from train.engine import Engine
from train.loop import RankContext
from train.vae_losses import (
    ADV_WEIGHT,
    DISC_WIDTH,
    FEATURE_WEIGHT,
    STFTDiscriminator,
    discriminator_hinge,
    feature_matching,
    generator_hinge,
    reconstruction_loss,
)

HOLDOUT_SECONDS = 4.0  # length of each held-out excerpt scored at checkpoints


def train(cfg: TrainConfig, ctx: RankContext, restore: Path | None) -> dict[str, Any]:
    """Train the VAE to ``cfg.run.max_steps`` (resuming from the checkpoint dir ``restore``); export, register."""
    urls = shard_format.shard_uris(cfg.data.shards, cfg.data.split)
    if not urls:
        raise ValueError(f"data.shards: no {cfg.data.split!r} shards under {cfg.data.shards}")
    if cfg.deepspeed.zero_stage == 3:
        raise ValueError("deepspeed.zero_stage: the VAE's two alternating engines support ZeRO stages 0-2")
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    vae = build_autoencoder(cfg.model.preset)
    engine = Engine(vae, cfg, ctx.rank, ctx.world_size)
    engines = {"": engine}
    adversarial = cfg.vae.adversarial
    if adversarial:  # a second engine, checkpointed under discriminator/
        disc = STFTDiscriminator(vae.cfg.audio_channels, width=DISC_WIDTH[cfg.model.preset])
        disc_engine = engines["discriminator"] = Engine(disc, cfg, ctx.rank, ctx.world_size, ema=False)
    window = max(vae.downsampling, round(cfg.data.window_seconds * vae.sample_rate))
    # Held-out excerpts of HOLDOUT_SECONDS from the start of each piece (zero-padded when shorter).
    holdout = data.holdout(cfg, round(HOLDOUT_SECONDS * vae.sample_rate), float(vae.sample_rate), 0.0, "flac")

    progress = loop.resume("vae", cfg, ctx, engines, restore)
    batches = data.batches_from(cfg, urls, window, float(vae.sample_rate), 0.0, ctx.rank, ctx.world_size, "flac")
    batches = batches(progress.step)
    kl_weight = cfg.vae.kl_weight
    while progress.step < cfg.run.max_steps:
        micro = 0
        while micro < cfg.deepspeed.grad_accum:
            batch = loop.to_device(progress.next_batch(batches), engine.device)
            if progress.skip_nonfinite(batch["x"]):  # before any forward: the discriminator steps inside this one
                continue
            audio = batch["x"].to(engine.dtype)  # (B, 2, N)
            recon, kl = engine(audio, sample=cfg.vae.sample_posterior)  # (B, 2, N), ()
            reconstruction, metrics = reconstruction_loss(recon.float(), audio.float(), cfg.vae)
            metrics["kl"] = float(kl.detach())
            if not adversarial:
                loss = reconstruction + kl_weight * kl
            else:
                # 1. the discriminator steps on the detached reconstruction
                d_loss = discriminator_hinge(disc_engine(audio), disc_engine(recon.detach()))
                disc_engine.backward(d_loss)
                disc_engine.step()
                # 2. the generator's terms through the discriminator, frozen for this pass
                disc.requires_grad_(False)
                real, fake = disc(audio), disc(recon)
                disc.requires_grad_(True)
                hinge, features = generator_hinge(fake), feature_matching(real, fake)
                loss = reconstruction + kl_weight * kl + ADV_WEIGHT * hinge + FEATURE_WEIGHT * features
                metrics.update(
                    adversarial=float(hinge.detach()),
                    feature_matching=float(features.detach()),
                    discriminator=float(d_loss.detach()),
                )
            if progress.skip_nonfinite(loss):
                continue
            engine.backward(loss)  # 3. the VAE (generator) steps
            engine.step()
            micro += 1
            progress.add(loss, metrics, len(audio))
        progress.step = engine.global_step
        progress.log(engine)
        if progress.due(cfg.run.checkpoint_every):
            weights = engine.export_state_dict() if holdout is not None else None  # collective: every rank
            evaluation = score(vae, weights, holdout) if weights is not None and ctx.is_main else None
            progress.checkpoint(engines, evaluation)

    weights = engine.export_state_dict()  # the EMA weights; collective: every rank
    calibration = None  # vae.unit_latents: the held-out audio, else a few training crops (only rank 0 exports)
    if cfg.vae.unit_latents and ctx.is_main:
        if holdout is not None:
            calibration = holdout["x"]
        else:
            calibration = torch.cat([progress.next_batch(batches)["x"] for _ in range(4)])
    preset = cfg.model.preset
    progress.export(
        weights, lambda directory: write_export(Autoencoder(vae.cfg), weights, preset, directory, calibration)
    )
    return progress.finish(*reversed(engines.values()))


def latent_rms(model: Autoencoder, audio: torch.Tensor) -> float:
    """RMS of the posterior means ``model`` gives ``audio`` (B, 2, N): the scale ``vae.unit_latents`` folds."""
    model.eval()
    with torch.no_grad():
        latents = torch.cat([model.encode(part.float()) for part in audio.split(4)])  # bounded activations
    return float(latents.square().mean().sqrt())


def score(vae: Autoencoder, weights: dict[str, torch.Tensor], holdout: dict[str, Any]) -> dict[str, float]:
    """Reconstruction figures of ``weights`` (what the export will hold) on the held-out audio (B, 2, N)."""
    model = Autoencoder(vae.cfg)
    model.load_state_dict(weights)
    return reconstruction_metrics(model, holdout["x"])


def write_export(
    model: Autoencoder,
    weights: dict[str, torch.Tensor],
    preset: str,
    directory: Path,
    calibration: torch.Tensor | None = None,
) -> None:
    """The format ``pipeline.components.load_vae`` reads (model.safetensors + config.json), the preset named; with
    ``calibration`` audio (B, 2, N), the latent is divided in the weights by its RMS on that audio
    (:meth:`Autoencoder.fold_latent_scale`) and the config says by what (``_latent_scale_folded``)."""
    model.load_state_dict(weights)
    markers: dict[str, object] = {"_preset": preset}
    if calibration is not None:
        scale = latent_rms(model, calibration)
        model.fold_latent_scale(scale)
        markers["_latent_scale_folded"] = scale
    save_vae(model, directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**config, **markers}, indent=2))
