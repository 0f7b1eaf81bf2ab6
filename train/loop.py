"""Small helpers the three training loops share; each loop itself lives in its model's module.

``train/vae.py``, ``train/clap.py`` and ``train/diffusion.py`` each read top to bottom as one loop over these::

    progress = resume(name, cfg, ctx, engine, restore)      checkpoint → step, run totals, the same MLflow run
    batches = data.batches_from(...)(progress.step)           a resumed run sees fresh crops
    while progress.step < cfg.run.max_steps:
        micro = 0
        while micro < grad_accum:
            batch = to_device(progress.next_batch(batches), engine.device)
            if progress.skip_nonfinite(batch["x"]): continue      NaN/inf inputs: skipped on every rank
            loss = ...                                             the model's own objective, in plain sight
            if progress.skip_nonfinite(loss): continue
            engine.backward(loss); engine.step(); micro += 1
            progress.add(loss, metrics, len(batch["x"]))           the metric window
        progress.step = engine.global_step
        progress.log(engine)                    every log_every: loss, lr, grad norm, samples/s, data wait, totals
        if progress.due(cfg.run.checkpoint_every): progress.checkpoint(...)   all ranks (Ray Train merges them)
    progress.export(engine.export_state_dict(), write)        EMA weights → files, MLflow, registered, published
    progress.finish(engine)
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

MAX_NONFINITE_IN_A_ROW = 100  # micro-batches skipped as non-finite with no good one between: the run has diverged
TOTALS = ("skipped_samples", "nonfinite_steps")  # run totals, all ranks together, kept in the checkpoint


@dataclass
class RankContext:
    """Where this process stands: its rank, the world size, and how checkpoints are reported and restored."""

    rank: int = 0
    world_size: int = 1
    report: Callable[[dict[str, Any], Path | None], None] | None = None  # (metrics, checkpoint dir or None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with every tensor (audio or latents, padding masks, timing, text ids) on ``device``; the one place a
    loop moves its inputs. Captions and counts stay as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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


def _reduce(values: dict[str, Any], world_size: int, device: torch.device, mean: bool) -> dict[str, Any]:
    """Sum (or mean) of ``values`` over ranks, keys in the same order everywhere; ints stay ints. The tensor lives on
    the rank's device, where the backend wants it (NCCL: the GPU)."""
    if world_size == 1 or not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64 if mean else torch.int64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world_size if mean else int(v) for k, v in zip(keys, t.tolist(), strict=True)}


def _finite(x: Any) -> bool:
    return not isinstance(x, torch.Tensor) or not x.is_floating_point() or bool(torch.isfinite(x).all())


@dataclass
class Progress:
    """One rank's bookkeeping between steps: the tracker, the step, run totals and the current metric window."""

    name: str  # "clap", "diffusion", "vae"
    cfg: TrainConfig
    ctx: RankContext
    tracker: Tracker
    step: int
    start_step: int  # where this launch began (restored from the checkpoint)
    device: torch.device  # where the rank's collectives run (gloo: CPU, NCCL: its GPU)
    samples_seen: int = 0
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0))
    last: dict[str, Any] = field(default_factory=dict)  # the last logged metrics (rank 0's view) + "step"
    nonfinite_in_a_row: int = 0
    # the window since the last log
    window_loss: float = 0.0
    window_extra: dict[str, float] = field(default_factory=dict)
    window_samples: int = 0
    window_skipped: int = 0
    window_wait: float = 0.0
    window_start: float = field(default_factory=time.perf_counter)

    # ------------------------------------------------------------------ inside a step
    def next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next batch, timing the wait and counting the unreadable samples the data passed over."""
        t0 = time.perf_counter()
        batch = next(batches)
        self.window_wait += time.perf_counter() - t0
        self.window_skipped += int(batch.get("skipped", 0))
        return batch

    def skip_nonfinite(self, x: torch.Tensor) -> bool:
        """Whether ``x`` (inputs or a loss) holds NaN/inf on any rank; then the micro-batch is skipped on all of them.

        A NaN would reach the weights, the EMA and the export through one step. Every rank must agree, since the
        next forward/backward is collective; the skip is counted once in ``nonfinite_steps``."""
        ok = _finite(x.detach() if isinstance(x, torch.Tensor) else x)
        if self.ctx.world_size > 1 and dist.is_initialized():
            flag = torch.tensor([int(ok)], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        if ok:
            return False
        self.totals["nonfinite_steps"] += 1  # agreed by every rank, so counted once, not summed
        self.nonfinite_in_a_row += 1
        log.warning("%s step %d: non-finite inputs or loss, micro-batch skipped", self.name, self.step)
        if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise FloatingPointError(f"{self.nonfinite_in_a_row} micro-batches in a row had non-finite inputs/loss")
        return True

    def add(self, loss: torch.Tensor, metrics: dict[str, float], samples: int) -> None:
        """Add a micro-step that was taken to the window; a ``"loss"`` in ``metrics`` is what gets logged as loss."""
        self.nonfinite_in_a_row = 0
        accum = self.cfg.deepspeed.grad_accum
        extra = dict(metrics)
        self.window_loss += extra.pop("loss", float(loss.detach())) / accum
        for k, v in extra.items():
            self.window_extra[k] = self.window_extra.get(k, 0.0) + v / accum
        self.window_samples += samples

    # ------------------------------------------------------------------ after a step
    def due(self, every: int) -> bool:
        """Every ``every`` steps and at the last one."""
        return self.step % every == 0 or self.step == self.cfg.run.max_steps

    def log(self, engine: Engine) -> None:
        """Every ``run.log_every`` steps: the window's means (over ranks), lr, grad norm, throughput and run totals."""
        if not self.due(self.cfg.run.log_every):
            return
        world = self.ctx.world_size
        steps_in_window = max(1, self.step - self.last.get("logged_step", self.start_step))
        elapsed = time.perf_counter() - self.window_start
        local = {
            "loss": self.window_loss / steps_in_window,
            **{k: v / steps_in_window for k, v in self.window_extra.items()},
            "data_wait_fraction": self.window_wait / max(elapsed, 1e-9),
        }
        metrics = _reduce(local, world, self.device, mean=True)
        skipped = _reduce({"skipped_samples": self.window_skipped}, world, self.device, mean=False)
        self.totals["skipped_samples"] += skipped["skipped_samples"]
        global_samples = self.window_samples * world
        self.samples_seen += global_samples
        metrics.update(
            lr=engine.lr(),
            grad_norm=engine.grad_norm(),
            samples_per_s=global_samples / max(elapsed, 1e-9),
            steps_per_s=steps_in_window / max(elapsed, 1e-9),
            samples_seen=self.samples_seen,
            **self.totals,
        )
        self.tracker.log_metrics(metrics, step=self.step)
        if self.ctx.is_main:
            log.info("%s step %d %s", self.name, self.step, {k: round(v or 0.0, 5) for k, v in metrics.items()})
        self.last = {**metrics, "step": self.step, "logged_step": self.step}
        self.window_loss, self.window_extra, self.window_samples, self.window_skipped = 0.0, {}, 0, 0
        self.window_wait, self.window_start = 0.0, time.perf_counter()

    def checkpoint(
        self,
        engines: dict[str, Engine],
        evaluation: dict[str, float] | None = None,
        write_extras: Callable[[Path], None] | None = None,
    ) -> None:
        """Log ``evaluation``, then every rank writes its part of the state to a fresh local dir and reports it; Ray
        Train merges and uploads. ``engines[""]`` is the model's engine; others (the discriminator) go in subdirs."""
        if evaluation is not None:
            self.tracker.log_metrics(evaluation, step=self.step)
            self.last.update(evaluation)
        state = {"samples_seen": self.samples_seen, **self.totals}
        if self.ctx.is_main:
            state["mlflow_run_id"] = self.tracker.run_id
        directory = Path(tempfile.mkdtemp(prefix=f"longplay-ckpt-{self.step:08d}-r{self.ctx.rank}-"))
        try:
            for name, engine in engines.items():
                if name:
                    engine.save(directory / name, {})
                else:
                    engine.save(directory, state)
            if self.ctx.is_main and write_extras is not None:
                write_extras(directory)
            if self.ctx.report is not None:
                clean = {k: v for k, v in self.last.items() if isinstance(v, int | float) and v is not None}
                self.ctx.report({**clean, "step": self.step}, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------------ the end
    def export(self, weights: dict[str, torch.Tensor], write: Callable[[Path], None]) -> None:
        """Rank 0: :func:`export` of ``weights`` (from ``engine.export_state_dict()``, which every rank calls)."""
        if self.ctx.is_main:
            export(self.name, self.cfg, self.tracker, weights, self.step, write)

    def finish(self, *engines: Engine) -> dict[str, Any]:
        """End the MLflow run and close the engines; returns the last logged metrics."""
        self.tracker.end()
        for engine in engines:
            engine.close()
        return self.last


def resume(
    name: str,
    cfg: TrainConfig,
    ctx: RankContext,
    engines: dict[str, Engine],
    restore: Path | None,
    tags: dict[str, str] | None = None,
) -> Progress:
    """Restore ``engines`` (``""``: the model's, others from their subdirs) from the checkpoint dir ``restore`` if
    any, and reopen the run's MLflow run (the same one on resume): the :class:`Progress` a loop starts from."""
    engine = engines[""]
    state: dict[str, Any] = {}
    if restore is not None:
        for sub, other in engines.items():
            if sub:
                other.load(restore / sub)
            else:
                state = other.load(restore)
        log.info("rank %d resumed from %s at step %d", ctx.rank, restore, engine.global_step)
    tracker = Tracker(enabled=ctx.is_main)
    run_key = storage.join(cfg.run.checkpoint_uri, cfg.run.name)
    tracker.start(cfg.run.experiment, cfg.run.name, run_id=state.get("mlflow_run_id"), run_key=run_key)
    tracker.log_config(cfg)
    tracker.set_tags({**tags_for(cfg), **(tags or {})} if ctx.is_main else {})
    step = engine.global_step
    tracker.log_metrics({"resumed_at_step": step}, step=step)
    return Progress(
        name=name,
        cfg=cfg,
        ctx=ctx,
        tracker=tracker,
        step=step,
        start_step=step,
        device=torch.device(engine.device),
        samples_seen=int(state.get("samples_seen", 0)),
        totals={k: int(state.get(k, 0)) for k in TOTALS},
        last={"step": step},
    )


def export(
    name: str, cfg: TrainConfig, tracker: Tracker, weights: dict[str, torch.Tensor], step: int, write: Callable
) -> None:
    """Weights → the files ``write(directory)`` makes + the resolved config; logged, registered, published next to the
    checkpoints under ``{checkpoint_uri}/{run name}/export``. Non-finite weights are refused before any of that."""
    broken = sorted(k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:  # never export, register or alias weights that would generate NaN audio
        raise FloatingPointError(f"{name}: not exported: non-finite weights in {broken[:5]} ({len(broken)} tensors)")
    with tempfile.TemporaryDirectory(prefix="longplay-export-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        write(out)
        (out / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True))
        tracker.log_artifacts(out, artifact_path="model")
        version = tracker.register(cfg.run.register_as or cfg.run.name, "model")
        target = publish_export(out, storage.join(cfg.run.checkpoint_uri, cfg.run.name), step)
        log.info("exported %s to %s (registered version %s)", name, target, version)


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
