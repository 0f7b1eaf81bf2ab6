"""`train diffusion`: the v-objective on VAE latents, conditioned on frozen text tokens and timing.

    crop (B, C, W), mask (B, W), caption, seconds_start, seconds_total
      caption ─frozen text conditioner (CLAP's penultimate text layer, or T5: model.text_encoder)→ tokens (B, L, D)
      t ~ U[0, 1), noise ~ N(0, I):  loss = ‖ v_θ(x_t, t | tokens, timing; CFG dropout) − v_target ‖² over every frame

The loss covers the padding too: a file shorter than the window is followed by the VAE's latent of silence, and
learning to produce that silence after ``seconds_total`` is how the model learns to end on time (Stable Audio §3.3;
a loss masked to the real frames never sees the end and fills the whole window).

Every ``run.demo_every`` steps rank 0 generates each demo prompt at each ``demo_seconds`` value with the EMA weights
through :meth:`pipeline.generate.Bundle.generate` (the code of ``longplay generate``: sample, decode with the frozen
VAE, trim to the request) and logs a wav and a spectrogram.
Fine-tuning: ``model.init_from`` starts the run from a bundle's diffusion weights (same preset) and, unless the
config names one, its text conditioner. With ``model.lora.rank`` > 0 only LoRA adapters on the backbone train
(:mod:`pipeline.lora`, peft): the export holds the adapters and the base bundle's URI, or with ``model.lora.merge``
the merged weights as a plain bundle.
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

from pipeline import lora
from pipeline import shards as shard_format
from pipeline.components import load_bundle, load_clap, load_text_conditioner, save_vae
from pipeline.config import TrainConfig
from pipeline.diffusion import sample, sample_t, v_loss
from pipeline.generate import Bundle, inference_autocast, write_wav
from pipeline.metrics import matched_and_shuffled, nonsilent_seconds
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.conditioning import ConditionedDiffusionModel, build_diffusion_model, guided_model_fn
from pipeline.text_conditioners import ClapText, TextConditioner
from pipeline.tracking import download_model
from pipeline.weights import weights_hash
from train import data, loop
from train.components import CONFIG_FILE, WEIGHTS_FILE, copy_export, load_vae, save_weights, vae_uri
from train.engine import Engine
from train.loop import RankContext

log = logging.getLogger(__name__)

DEMO_STEPS = 25  # sampler steps for demos: enough to hear the model, cheap next to training


def train(cfg: TrainConfig, ctx: RankContext, restore: Path | None) -> dict[str, Any]:
    """Train the diffusion model to ``cfg.run.max_steps`` (resuming from ``restore``); export the whole bundle."""
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
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_diffusion_model(cfg.model.preset, cfg.model.activation_checkpointing, cfg.model.compile)
    base = fine_tune_base(cfg, model)  # model.init_from: the base bundle's weights (None when training from scratch)
    text_kind, text_uri = text_encoder_of(cfg, base)
    text = base.text if base is not None and base.text_source == (text_kind, text_uri) else None
    text = text or load_text_conditioner(text_kind, text_uri, max_tokens=model.cfg.max_text_tokens)
    # The held-out CLAP score embeds with a CLAP: the conditioning one, or model.clap beside a T5.
    scorer = text if isinstance(text, ClapText) else None
    if scorer is None and cfg.model.clap:
        scorer = ClapText(*load_clap(cfg.model.clap)[:2])
    lora_settings = None
    if cfg.model.lora.rank:  # only the adapters train; every base weight stays as the bundle has it
        lora_cfg = cfg.model.lora
        lora_settings = lora.settings(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.target_modules)
        lora_settings["base_sha256"] = weights_hash(model)  # generation checks that the base is still this one
        lora.add_adapters(model, lora_settings)
    frame_rate = model.cfg.timing_frame_rate  # the per-frame timing channel counts frames at the VAE's rate
    if frame_rate > 0 and abs(frame_rate - rate) > 1e-6 * rate:
        raise ValueError(
            f"model.preset: {cfg.model.preset} counts timing frames at {frame_rate:g}/s, "
            f"the shards' latents are {rate:g}/s"
        )
    engine = Engine(model, cfg, ctx.rank, ctx.world_size)
    vae, text = vae.to(engine.device), text.to(engine.device)  # frozen, beside the model they feed and decode for
    scorer = scorer.to(engine.device) if scorer is not None else None
    holdout = data.holdout(cfg, window, rate, silence)

    tags = {"text_encoder": text_kind, "text_encoder_uri": text_uri}
    if base is not None:
        tags["base_model"] = cfg.model.init_from
    if lora_settings is not None:
        tags["lora_rank"] = str(lora_settings["rank"])
    progress = loop.resume("diffusion", cfg, ctx, {"": engine}, restore, tags=tags)
    batches = data.batches_from(cfg, urls, window, rate, silence, ctx.rank, ctx.world_size)(progress.step)
    while progress.step < cfg.run.max_steps:
        micro = 0
        while micro < cfg.deepspeed.grad_accum:
            batch = loop.to_device(progress.next_batch(batches), engine.device)
            if progress.skip_nonfinite(batch["x"]):
                continue
            with torch.no_grad(), inference_autocast(engine.device, cpu=False):  # frozen, bf16 on CUDA: (B, L, D)
                tokens, token_mask = text.encode(batch["caption"])
            loss = diffusion_loss(engine, batch, tokens, token_mask, cfg.cfg_dropout, engine.dtype)
            if progress.skip_nonfinite(loss):
                continue
            engine.backward(loss)
            engine.step()
            micro += 1
            progress.add(loss, {}, len(batch["x"]))
        progress.step = engine.global_step
        progress.log(engine)

        if ctx.is_main and progress.due(cfg.run.demo_every):  # rank 0, the EMA weights
            weights = engine.ema_state_dict()
            if weights is not None and progress.tracker.enabled:
                model_ = _model(cfg, weights, engine.device, lora_settings)
                bundle = Bundle(vae, text, model_, _bundle_config(cfg, rate))
                with tempfile.TemporaryDirectory(prefix="longplay-demo-") as tmp:
                    for path in render_demos(bundle, cfg, Path(tmp)):
                        progress.tracker.log_artifact(path, artifact_path=f"demo/step_{progress.step:08d}")
        if progress.due(cfg.run.checkpoint_every):
            evaluation = None
            if holdout is not None:
                weights = engine.export_state_dict()  # the EMA weights the export holds; collective: every rank
                if ctx.is_main:
                    model_ = _model(cfg, weights, engine.device, lora_settings)
                    evaluation = holdout_generation(model_, vae, text, scorer, holdout["caption"], cfg, window, rate)
            progress.checkpoint({"": engine}, evaluation)

    weights = engine.export_state_dict()  # collective: every rank

    def write_export(directory: Path) -> None:
        config = {
            "kind": "diffusion",
            "preset": cfg.model.preset,
            "latent_rate": rate,
            "latent_channels": vae.latent_channels,
            "window_seconds": cfg.data.window_seconds,
            "text_encoder": text_kind,
            "vae": vae_uri(cfg.model.vae, index),
            **({"base": cfg.model.init_from} if base is not None else {}),
        }
        if lora_settings is not None and not cfg.model.lora.merge:  # the adapters alone; the base bundle has the rest
            save_weights(lora.adapter_state_dict(weights), directory / WEIGHTS_FILE)
            (directory / CONFIG_FILE).write_text(json.dumps({**config, "lora": lora_settings}, indent=2))
            return
        merged = weights
        if lora_settings is not None:  # model.lora.merge: a plain bundle with the adapters folded in
            merged = lora.merge_adapters(_model(cfg, weights, torch.device("cpu"), lora_settings)).state_dict()
        save_weights(merged, directory / WEIGHTS_FILE)
        config.update({"clap": text_uri} if text_kind == "clap" else {"t5": text_uri})
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if text_kind == "clap":
            copy_export(text_uri, directory / "clap")
        save_vae(vae, directory / "autoencoder")

    progress.export(weights, write_export)
    return progress.finish(engine)


def fine_tune_base(cfg: TrainConfig, model: ConditionedDiffusionModel) -> Bundle | None:
    """With ``model.init_from``: load that bundle and copy its diffusion weights into ``model``, which must be the same
    preset; returns the bundle (its text conditioner is the default). Else None."""
    if not cfg.model.init_from:
        return None
    try:
        root = download_model(cfg.model.init_from)
        if "lora" in json.loads((root / CONFIG_FILE).read_text()):
            raise ValueError("LoRA adapters, not a whole model; export them merged (model.lora.merge) to start from")
        base = load_bundle(str(root), "cpu")
    except (ValueError, OSError) as err:
        raise ValueError(f"model.init_from: {err}") from err
    if base.config["preset"] != cfg.model.preset:
        raise ValueError(f"model.init_from: a {base.config['preset']} bundle; model.preset is {cfg.model.preset}")
    model.load_state_dict(base.diffusion.state_dict(), strict=True)
    return base


def text_encoder_of(cfg: TrainConfig, base: Bundle | None) -> tuple[str, str]:
    """(kind, URI) of the text conditioner: the config's when it names one, else the base bundle's."""
    kind = cfg.model.text_encoder
    uri = cfg.model.t5 if kind == "t5" else cfg.model.clap
    if uri:
        return kind, uri
    if base is None or base.text_source is None:  # the schema requires model.clap / model.t5 without init_from
        raise ValueError(f"model.{kind}: not set")
    return base.text_source


def _model(
    cfg: TrainConfig, weights: dict[str, torch.Tensor], device: torch.device, lora_settings: dict[str, Any] | None
) -> ConditionedDiffusionModel:
    """A copy of the model with ``weights`` (EMA, adapters included) for sampling, on ``device``."""
    model = build_diffusion_model(cfg.model.preset)
    if lora_settings is not None:
        lora.add_adapters(model, lora_settings)
    model.load_state_dict(weights, strict=False)
    return model.to(device).eval()


def _bundle_config(cfg: TrainConfig, rate: float) -> dict[str, Any]:
    """What generation reads from a bundle's config.json, for the model being trained."""
    return {"latent_rate": rate, "window_seconds": cfg.data.window_seconds}


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
    t = sample_t(x0.shape[0], device=x0.device).to(dtype)
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
    text: TextConditioner,
    scorer: ClapText | None,
    captions: list[str],
    cfg: TrainConfig,
    window: int,
    rate: float,
) -> dict[str, float]:
    """Generate up to :data:`HOLDOUT_GENERATIONS` held-out captions at ``cfg.holdout_seconds`` (cycled) in one
    batch of full windows and measure what a user cares about:

    - timing: the decoded raw window's non-silent length (last 0.1 s frame above −40 dB re peak, as ``longplay
      evaluate`` measures it) against the requested ``seconds_total`` = ceil(seconds);
    - prompt adherence (with a CLAP ``scorer``): the CLAP score (cosine of text and audio embeddings; audio embedded
      from the generated latents, masked to the requested length) of matched pairs, and of every mismatched pair as
      the baseline.
    """
    captions = captions[:HOLDOUT_GENERATIONS]
    n, device = len(captions), next(model.parameters()).device  # the frozen VAE and encoders are there too
    requested = [float(np.ceil(cfg.holdout_seconds[i % len(cfg.holdout_seconds)])) for i in range(n)]
    seconds_total = torch.tensor(requested, device=device)
    with inference_autocast(device):  # as generation runs: bf16 on CUDA, the VAE decode in fp32
        tokens, tmask = text.encode(captions)
        fn = guided_model_fn(model, tokens, tmask, torch.zeros(n, device=device), seconds_total, cfg.sample_cfg_scale)
        shape = (n, vae.latent_channels, window)
        latents = sample(fn, shape, steps=DEMO_STEPS, seed=cfg.run.seed, device=device).float()  # (n, C, W)
    audio = vae.decode(latents).clamp(-1, 1).float().cpu().numpy()  # (n, 2, W·D)
    errors = [abs(nonsilent_seconds(a, vae.sample_rate) - s) for a, s in zip(audio, requested, strict=True)]
    out = {
        "holdout_timing_median_abs_error_s": float(np.median(errors)),
        "holdout_timing_within_1s": float(np.mean([e <= 1.0 for e in errors])),
    }
    if scorer is None:
        return out
    encoded = scorer.tokenizer.encode_batch(captions, max_length=scorer.max_tokens)
    ids, mask = (torch.from_numpy(a).to(device) for a in encoded)  # (n, L)
    frames = torch.arange(window, device=device)[None, :] < seconds_total[:, None] * rate  # (n, W) requested frames
    clap = scorer.clap
    matched, shuffled = matched_and_shuffled(
        clap.encode_text(ids, mask).float().cpu().numpy(), clap.encode_audio(latents, frames).float().cpu().numpy()
    )
    out["holdout_clap_score_matched"] = matched
    if shuffled is not None:
        out["holdout_clap_score_shuffled"] = shuffled
    return out


def render_demos(bundle: Bundle, cfg: TrainConfig, out: Path) -> list[Path]:
    """Generate every (prompt, seconds) pair as ``longplay generate`` does (:meth:`Bundle.generate`, trimmed to the
    request); write ``pNN_Ss.wav`` and ``pNN_Ss.png`` into ``out``."""
    paths = []
    for p, prompt in enumerate(cfg.demo_prompts):
        for seconds in cfg.demo_seconds:
            (audio,) = bundle.generate(
                [prompt], seconds, steps=DEMO_STEPS, cfg_scale=cfg.sample_cfg_scale, seed=cfg.run.seed + p
            )
            stem = f"p{p:02d}_{seconds:g}s"  # not Path.with_suffix: it would cut "2.5s" to "2"
            paths += [write_wav(out / f"{stem}.wav", audio, bundle.sample_rate)]
            paths += [write_spectrogram(out / f"{stem}.png", audio, bundle.sample_rate, f"{prompt} ({seconds:g} s)")]
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
