"""`train clap`: symmetric InfoNCE between captions and VAE latents, recall@1/@5/@10 on a held-out split.

The contrastive batch is the *global* batch: every rank gathers the others' embeddings (no gradient through
theirs) and scores its own captions and latents against all of them, as open_clip's "local loss" does. Each rank's
loss is then the same global loss, while the gradient flows through its own embeddings only; multiplying by the
world size undoes DeepSpeed's averaging over ranks, so the step equals the single-process one on the whole batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline import shards as shard_format
from pipeline.config import TrainConfig
from pipeline.models.clap import CLAP, build_clap, info_nce, recall_at_k
from pipeline.text import CaptionTokenizer, train_tokenizer
from train import data, loop
from train.components import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_vae, save_weights, vae_uri
from train.engine import Engine
from train.loop import RankContext

log = logging.getLogger(__name__)


class ClapEmbeddings(nn.Module):
    """The engine's module: CLAP → (text (B, P), audio (B, P), inverse temperature ()), so ZeRO-3 gathers every
    parameter (the logit scale included) inside one forward."""

    def __init__(self, clap: CLAP) -> None:
        super().__init__()
        self.clap = clap

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, latents: torch.Tensor, latent_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        clap = self.clap
        return clap.encode_text(ids, mask), clap.encode_audio(latents, latent_mask), clap.temperature_inverse


def gather_with_local_grad(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """(B, P) per rank → (world·B, P), this rank's rows keeping their gradient."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def tokenizer_for(urls: list[str], restore: Path | None) -> CaptionTokenizer:
    """The checkpoint's tokenizer on resume, else one trained on the shards' captions (same on every rank)."""
    if restore is not None and (restore / TOKENIZER_FILE).exists():
        return CaptionTokenizer.load(restore / TOKENIZER_FILE)
    return train_tokenizer(data.read_captions(urls))


def encode_text(tokenizer: CaptionTokenizer, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, ...]:
    ids, mask = tokenizer.encode_batch(captions, max_length=max_tokens)
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.no_grad()
def holdout_recall(clap: CLAP, tokenizer: CaptionTokenizer, batch: dict[str, Any]) -> dict[str, float]:
    """Text→audio recall@1/@5/@10 over the held-out crops (each caption against every crop), with the chance level
    of recall@1 (1 / candidates) beside it so the figure can be read on its own."""
    clap.eval()
    ids, mask = encode_text(tokenizer, batch["caption"], clap.config.text.max_tokens)
    t, a = clap.encode_text(ids, mask), clap.encode_audio(batch["x"], batch["mask"])
    n = len(t)
    return {
        "recall_at_1": recall_at_k(t, a, 1),
        "recall_at_5": recall_at_k(t, a, min(5, n)),
        "recall_at_10": recall_at_k(t, a, min(10, n)),
        "recall_chance_at_1": 1.0 / n,
        "holdout_candidates": float(n),
    }


def train(cfg: TrainConfig, ctx: RankContext, restore: Path | None) -> dict[str, Any]:
    """Train CLAP to ``cfg.run.max_steps`` (resuming from the checkpoint dir ``restore``); export, register."""
    index = shard_format.read_index(cfg.data.shards)
    urls = shard_format.shard_uris(cfg.data.shards, cfg.data.split)
    if not urls:
        raise ValueError(f"data.shards: no {cfg.data.split!r} shards under {cfg.data.shards}")
    rate, channels = float(index["latent_rate"]), int(index["latent_channels"])
    window = max(1, round(cfg.data.window_seconds * rate))
    pad = data.silence_latent(load_vae(vae_uri(cfg.model.vae, index))) if _has_vae(cfg, index) else 0.0

    tokenizer = tokenizer_for(urls, restore)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    clap = build_clap(cfg.model.preset, vocab_size=tokenizer.vocab_size)
    if clap.config.audio.latent_channels != channels:
        raise ValueError(
            f"model.preset: CLAP expects {clap.config.audio.latent_channels}-ch latents, shards have {channels}"
        )
    engine = Engine(ClapEmbeddings(clap), cfg, ctx.rank, ctx.world_size)
    max_tokens = clap.config.text.max_tokens
    holdout = data.holdout(cfg, window, rate, pad)

    progress = loop.resume("clap", cfg, ctx, {"": engine}, restore)
    batches = data.batches_from(cfg, urls, window, rate, pad, ctx.rank, ctx.world_size)(progress.step)
    while progress.step < cfg.run.max_steps:
        micro = 0
        while micro < cfg.deepspeed.grad_accum:
            batch = progress.next_batch(batches)
            ids, text_mask = encode_text(tokenizer, batch["caption"], max_tokens)  # (B, L) each
            batch = loop.to_device({**batch, "ids": ids, "text_mask": text_mask}, engine.device)
            if progress.skip_nonfinite(batch["x"]):
                continue
            text, audio, scale = engine(batch["ids"], batch["text_mask"], batch["x"].to(engine.dtype), batch["mask"])
            # The global batch: every rank scores its captions against all ranks' audio and the reverse.
            text = gather_with_local_grad(text, ctx.rank, ctx.world_size)
            audio = gather_with_local_grad(audio, ctx.rank, ctx.world_size)
            out = info_nce(text.float(), audio.float(), scale.float())
            loss = out.loss * ctx.world_size  # undoes DeepSpeed's mean over ranks: the global batch's gradient
            if progress.skip_nonfinite(loss):
                continue
            engine.backward(loss)
            engine.step()
            micro += 1
            metrics = {"loss": float(out.loss.detach()), "logit_scale": float(scale.detach())}  # loss before scaling
            progress.add(loss, metrics, len(batch["x"]))
        progress.step = engine.global_step
        progress.log(engine)
        if progress.due(cfg.run.checkpoint_every):
            evaluation = None
            if cfg.data.holdout_split:
                weights = engine.full_state_dict()  # collective under ZeRO-3: every rank calls it
                if ctx.is_main and holdout is not None:
                    evaluation = holdout_recall(_clap(cfg, tokenizer, weights), tokenizer, holdout)
            progress.checkpoint({"": engine}, evaluation, lambda directory: tokenizer.save(directory / TOKENIZER_FILE))

    weights = engine.export_state_dict()  # the EMA weights; collective: every rank

    def write_export(directory: Path) -> None:
        tokenizer.save(directory / TOKENIZER_FILE)
        save_weights(weights, directory / WEIGHTS_FILE, prefix="clap.")
        config = {
            "kind": "clap",
            "preset": cfg.model.preset,
            "vocab_size": tokenizer.vocab_size,
            "text_pooling": clap.config.text.pooling,
            "latent_channels": channels,
            "latent_rate": rate,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    progress.export(weights, write_export)
    return progress.finish(engine)


def _clap(cfg: TrainConfig, tokenizer: CaptionTokenizer, weights: dict[str, torch.Tensor]) -> CLAP:
    model = build_clap(cfg.model.preset, vocab_size=tokenizer.vocab_size)
    model.load_state_dict({k.removeprefix("clap."): v for k, v in weights.items()})
    return model


def _has_vae(cfg: TrainConfig, index: dict[str, Any]) -> bool:
    # CLAP masks padded frames, so the silence latent only matters for consistency; a missing VAE is not fatal.
    return bool(cfg.model.vae or index.get("vae_id"))
