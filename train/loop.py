"""The step loop every model shares: resume, micro-steps, metrics, checkpoints, demos, export and registration.

A model module (``train/clap.py``, ``train/diffusion.py``, ``train/vae.py``) builds a :class:`Task` — its engine,
its batches and a ``loss_fn`` — and hands it to :func:`run`, which is one visible loop::

    restore newest checkpoint (step, optimizer, EMA, MLflow run id) ─┐
    for step in start..max_steps:                                    │ every rank
        grad_accum × (next batch → loss → backward → micro-step)    │
          (a batch or loss with NaN/inf: skipped on every rank)      │
        every log_every: loss, lr, grad norm, samples/s, data wait, │ rank 0 logs
                         skipped_samples, nonfinite_steps (totals)   │
        every demo_every: task.demo (rank 0, EMA weights)            │
        every checkpoint_every and at the end: save + report         │ all ranks (a barrier)
    export the EMA weights (safetensors + resolved config), register in MLflow with an alias
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline import shards as shard_format
from pipeline import storage
from pipeline.config import TrainConfig, config_hash
from pipeline.tracking import EXPORT_POINTER, EXPORTS_DIR, Tracker, git_sha
from train.engine import Engine

log = logging.getLogger(__name__)

LossFn = Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class RankContext:
    """Where this process stands: its rank, the world size, and how checkpoints are reported and restored."""

    rank: int = 0
    world_size: int = 1
    report: Callable[[dict[str, Any], Path | None], None] | None = None  # (metrics, checkpoint dir or None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Task:
    """What a model brings to the shared loop."""

    name: str  # "clap", "diffusion", "vae"
    engine: Engine
    batches: Callable[[int], Iterator[dict[str, Any]]]  # start step → batches (a resumed run sees fresh crops)
    loss_fn: LossFn  # batch → (loss to backpropagate, metrics; a "loss" entry there is what gets logged as loss)
    batch_size: Callable[[dict[str, Any]], int] = lambda b: len(b["x"])
    write_extras: Callable[[Path], None] = lambda d: None  # tokenizer etc. into a checkpoint and the export
    export: Callable[[dict[str, torch.Tensor], Path], None] | None = None  # (export state dict, dir) → files
    evaluate: Callable[[int], dict[str, float]] | None = None  # every rank calls it at checkpoints; returns metrics
    demo: Callable[[int, Tracker], None] | None = None  # rank 0, every demo_every steps and at the end
    tags: dict[str, str] = field(default_factory=dict)
    aux: dict[str, Engine] = field(default_factory=dict)  # further engines (e.g. the VAE's discriminator), saved too


def tags_for(cfg: TrainConfig) -> dict[str, str]:
    """Git sha, shard index hash, VAE id and config hash: what ties a run to its code, data and settings."""
    tags = {"git_sha": git_sha(Path(__file__).resolve().parent), "config_hash": config_hash(cfg), "kind": cfg.kind}
    try:
        index = shard_format.read_index(cfg.data.shards)
        tags["shard_index_hash"] = shard_format.index_hash(cfg.data.shards)
        tags["vae_id"] = str(index.get("vae_id"))
    except (FileNotFoundError, storage.StorageError, ValueError) as exc:
        log.warning("no shard index for tags: %s", exc)
    if cfg.model.vae:
        tags["vae_uri"] = cfg.model.vae
    return tags


def _mean_across_ranks(values: dict[str, float], world_size: int) -> dict[str, float]:
    if world_size == 1 or not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world_size for k, v in zip(keys, t.tolist(), strict=True)}


def _sum_across_ranks(values: dict[str, int], world_size: int) -> dict[str, int]:
    if world_size == 1 or not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.int64)
    dist.all_reduce(t)
    return {k: int(v) for k, v in zip(keys, t.tolist(), strict=True)}


MAX_NONFINITE_IN_A_ROW = 100  # micro-batches skipped as non-finite with no good one between: the run has diverged


def _all_ranks(ok: bool, world_size: int) -> bool:
    """Whether ``ok`` holds on every rank (a skip must be agreed: the next micro-step is collective)."""
    if world_size == 1 or not dist.is_initialized():
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _finite(x: Any) -> bool:
    return not isinstance(x, torch.Tensor) or not x.is_floating_point() or bool(torch.isfinite(x).all())


def run(task: Task, cfg: TrainConfig, ctx: RankContext, restore: Path | None = None) -> dict[str, Any]:
    """Train ``task`` to ``cfg.run.max_steps`` from the checkpoint dir ``restore`` (if any); returns the last logged
    metrics (rank 0's view)."""
    engine, r = task.engine, cfg.run
    state: dict[str, Any] = {}
    if restore is not None:
        state = engine.load(restore)
        for name, aux in task.aux.items():
            aux.load(restore / name)
        log.info("rank %d resumed from %s at step %d", ctx.rank, restore, engine.global_step)
    tracker = Tracker(enabled=ctx.is_main)
    run_key = storage.join(r.checkpoint_uri, r.name)
    tracker.start(r.experiment, r.name, run_id=state.get("mlflow_run_id"), run_key=run_key)
    tracker.log_config(cfg)
    tracker.set_tags({**tags_for(cfg), **task.tags} if ctx.is_main else {})
    start_step = engine.global_step
    samples_seen = int(state.get("samples_seen", 0))
    # Run totals, all ranks together: unreadable samples the data passed over, micro-batches skipped as non-finite.
    totals = {k: int(state.get(k, 0)) for k in ("skipped_samples", "nonfinite_steps")}
    nonfinite_in_a_row = 0
    tracker.log_metrics({"resumed_at_step": start_step}, step=start_step)
    last: dict[str, Any] = {"step": start_step}
    batches = task.batches(start_step)

    window_loss, window_extra, window_samples = 0.0, {}, 0
    window_wait, window_start = 0.0, time.perf_counter()
    window_counts = {"skipped_samples": 0}
    step = start_step
    while step < r.max_steps:
        micro = 0
        while micro < cfg.deepspeed.grad_accum:
            t0 = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - t0
            window_counts["skipped_samples"] += int(batch.get("skipped", 0))
            # A NaN/inf in the inputs or the loss would reach the weights, the EMA and the export through one step:
            # skip the micro-batch on every rank (inputs before loss_fn, which may itself be collective).
            ok = _all_ranks(_finite(batch.get("x")), ctx.world_size)
            if ok:
                loss, extra = task.loss_fn(batch)
                ok = _all_ranks(_finite(loss.detach()), ctx.world_size)
            if not ok:
                totals["nonfinite_steps"] += 1  # agreed by every rank, so counted once, not summed
                nonfinite_in_a_row += 1
                log.warning("%s step %d: non-finite inputs or loss, micro-batch skipped", task.name, step)
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise FloatingPointError(f"{nonfinite_in_a_row} micro-batches in a row had non-finite inputs/loss")
                continue
            nonfinite_in_a_row = 0
            micro += 1
            engine.backward(loss)
            engine.step()
            window_loss += extra.pop("loss", float(loss.detach())) / cfg.deepspeed.grad_accum
            for k, v in extra.items():
                window_extra[k] = window_extra.get(k, 0.0) + v / cfg.deepspeed.grad_accum
            window_samples += task.batch_size(batch)
        step = engine.global_step

        if step % r.log_every == 0 or step == r.max_steps:
            steps_in_window = max(1, step - last.get("logged_step", start_step))
            elapsed = time.perf_counter() - window_start
            local = {
                "loss": window_loss / steps_in_window,
                **{k: v / steps_in_window for k, v in window_extra.items()},
                "data_wait_fraction": window_wait / max(elapsed, 1e-9),
            }
            metrics = _mean_across_ranks(local, ctx.world_size)
            for key, count in _sum_across_ranks(window_counts, ctx.world_size).items():
                totals[key] += count
            global_samples = window_samples * ctx.world_size
            samples_seen += global_samples
            metrics.update(
                lr=engine.lr(),
                grad_norm=engine.grad_norm(),
                samples_per_s=global_samples / max(elapsed, 1e-9),
                steps_per_s=steps_in_window / max(elapsed, 1e-9),
                samples_seen=samples_seen,
                **totals,
            )
            tracker.log_metrics(metrics, step=step)
            if ctx.is_main:
                log.info("%s step %d %s", task.name, step, {k: round(v or 0.0, 5) for k, v in metrics.items()})
            last = {**metrics, "step": step, "logged_step": step}
            window_loss, window_extra, window_samples = 0.0, {}, 0
            window_wait, window_start = 0.0, time.perf_counter()
            window_counts = {"skipped_samples": 0}

        if task.demo is not None and ctx.is_main and (step % r.demo_every == 0 or step == r.max_steps):
            task.demo(step, tracker)
        if step % r.checkpoint_every == 0 or step == r.max_steps:
            if task.evaluate is not None:
                evaluation = task.evaluate(step)
                tracker.log_metrics(evaluation, step=step)
                last.update(evaluation)
            _checkpoint(task, ctx, tracker, {"samples_seen": samples_seen, **totals}, last, step)

    _export(task, cfg, ctx, tracker)
    tracker.end()
    for aux in task.aux.values():
        aux.close()
    engine.close()
    return last


def _checkpoint(
    task: Task, ctx: RankContext, tracker: Tracker, state: dict[str, Any], metrics: dict[str, Any], step: int
) -> None:
    """Every rank writes its part of the state to a fresh local dir and reports it; Ray Train merges and uploads."""
    directory = Path(tempfile.mkdtemp(prefix=f"longplay-ckpt-{step:08d}-r{ctx.rank}-"))
    try:
        task.engine.save(directory, {**state, "mlflow_run_id": tracker.run_id} if ctx.is_main else state)
        for name, aux in task.aux.items():
            aux.save(directory / name, {})
        if ctx.is_main:
            task.write_extras(directory)
        if ctx.report is not None:
            clean = {k: v for k, v in metrics.items() if isinstance(v, int | float) and v is not None}
            ctx.report({**clean, "step": step}, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _export(task: Task, cfg: TrainConfig, ctx: RankContext, tracker: Tracker) -> None:
    """EMA weights → safetensors + resolved config (+ the task's extras); logged, registered, copied next to the
    checkpoints under ``{checkpoint_uri}/{run name}/export``. Every rank joins (the gather is collective)."""
    weights = task.engine.export_state_dict()
    if not ctx.is_main or task.export is None:
        return
    broken = sorted(k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:  # never export, register or alias weights that would generate NaN audio
        raise FloatingPointError(
            f"{task.name}: not exported: non-finite weights in {broken[:5]} ({len(broken)} tensors)"
        )
    with tempfile.TemporaryDirectory(prefix="longplay-export-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        task.export(weights, out)
        task.write_extras(out)
        (out / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True))
        tracker.log_artifacts(out, artifact_path="model")
        version = tracker.register(cfg.run.register_as or cfg.run.name, "model")
        target = publish_export(out, storage.join(cfg.run.checkpoint_uri, cfg.run.name), task.engine.global_step)
        log.info("exported %s to %s (registered version %s)", task.name, target, version)


def publish_export(out: Path, run_dir: str, step: int) -> str:
    """Copy the export folder ``out`` to ``{run_dir}/exports/{version}/``, then point ``{run_dir}/export`` at it.

    S3 has no atomic rename of a folder, so the pointer is what makes an export appear at once::

        {run_dir}/exports/00000020-20260101T120000Z/...   every file, each write retried (storage.write_file)
        {run_dir}/export/...                              a copy of the same files, for readers of plain files
        {run_dir}/export/EXPORT.json                      {"folder": "exports/<version>", "files": [...]}: last

    Readers that resolve the pointer (``pipeline.tracking.resolve_export``: ``download_model``, ``load_vae``,
    generation) see the old export or the new one, never a mix, whatever point a crash stops this at. The plain
    copy under ``export/`` is rewritten in place before the pointer moves, for readers that open its files directly.
    Returns the versioned folder's URI.
    """
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    version = f"{step:08d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    folder = storage.join(run_dir, EXPORTS_DIR, version)
    for name in files:
        storage.write_file(storage.join(folder, name), out / name)
    for name in files:
        storage.write_file(storage.join(run_dir, "export", name), out / name)
    pointer = {"folder": f"{EXPORTS_DIR}/{version}", "files": files}
    storage.write_text(storage.join(run_dir, "export", EXPORT_POINTER), json.dumps(pointer, indent=2))
    return folder
