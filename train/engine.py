"""One DeepSpeed engine per rank, built from our config: the only module that imports DeepSpeed.

The loops see a small surface: ``engine(…)`` runs the model, ``engine.backward(loss)`` and ``engine.step()`` do a
micro-step (DeepSpeed steps the optimizer every ``grad_accum`` micro-steps, with clipping and the lr schedule),
``engine.ema`` is the moving average of the weights, and ``save``/``load`` move the whole training state through a
directory that Ray Train persists::

    checkpoint dir/
      deepspeed/state/...          DeepSpeed's files: model, optimizer (one shard per rank under ZeRO), scheduler
      ema.safetensors              the EMA weights (rank 0)
      trainer_state.json           global step, samples seen, MLflow run id, and whatever the loop adds (rank 0)

Every rank writes its own files into its own directory; Ray Train merges the directories of all ranks into one
checkpoint, and on restore every rank sees the merged directory.

No pickle on load. DeepSpeed writes its ``*.pt`` files with ``torch.save`` and its default checkpoint engine reads
them back with ``torch.load(weights_only=False)``, i.e. full unpickling: a tampered checkpoint could run code. We
keep DeepSpeed's file layout (it differs per ZeRO stage and precision, and DeepSpeed alone knows how to re-partition
it) but install a checkpoint engine whose ``load`` is ``torch.load(weights_only=True)`` with an explicit allow-list,
:data:`DEEPSPEED_SAFE_GLOBALS`: the four plain-data classes DeepSpeed puts into its optimizer files. Anything else
in a file is refused; there is no fallback to full unpickling. DeepSpeed's offline recovery scripts
(``zero_to_fp32.py``, which unpickle) are not kept in our checkpoints.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import DeepSpeedSection, TrainConfig

DS_TAG = "state"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"

# The only non-tensor globals DeepSpeed (0.19) writes into its checkpoint files beyond torch's own weights-only set,
# found with torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3 x fp32/bf16 (+ fp16's scaler). Each
# is plain data: the weights-only unpickler creates it with ``cls.__new__`` and fills ``__dict__`` (none defines
# ``__setstate__``), or, for the int enum, looks the member up by value. None runs code of the file's choosing.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1-3 optimizer files: the static scaler (1 on fp32/bf16)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same under fp16 (GPU): scale, window, counters
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1-2 param slice mappings: dataclass(numel, start)
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # the ZeRO stage, an int Enum
)


# ----------------------------------------------------------------------------------------------- schedule (pure)
def lr_factor(step: int, warmup_steps: int, decay: str, max_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step``: linear warmup, then cosine / constant / inverse-sqrt."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if decay == "inverse":
        return math.sqrt(max(warmup_steps, 1) / max(step + 1, 1))
    span = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(ds: DeepSpeedSection, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for our ``deepspeed`` section (fp16 without a GPU is refused by the schema)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": ds.micro_batch * ds.grad_accum * world_size,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        # torch's AdamW: DeepSpeed's fused/CPU Adam would compile a kernel first (minutes on a small CPU box).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        # Small models: keep every parameter gathered per module call rather than prefetching big buckets.
        config["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


# ----------------------------------------------------------------------------------------------- pickle-free loading
def _safe_globals() -> list[type]:
    classes = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def load_weights_only(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` of a DeepSpeed checkpoint file; the only extra globals allowed are
    :data:`DEEPSPEED_SAFE_GLOBALS`. A file that needs anything else raises ``pickle.UnpicklingError``."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            # torch's message suggests weights_only=False; we never do that, so name only what was refused.
            reason = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler" in line), str(err))
            raise pickle.UnpicklingError(f"{path}: refused (weights-only load): {reason}") from err


def _pickle_free_checkpoint_engine(engine: Any) -> Any:
    """DeepSpeed's own torch checkpoint engine (same files, same saving) whose ``load`` is :func:`load_weights_only`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        # Our deepspeed_config never picks another engine (nebula, fast/decoupled writers); refuse rather than guess.
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_weights_only(path, map_location)

    return WeightsOnlyCheckpointEngine(engine._config)


# ----------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's weights, kept in fp32: ema ← d·ema + (1 − d)·w.

    The effective decay warms up as min(d, (1 + n) / (10 + n)) so that the average is not dominated by the random
    initial weights during the first few hundred steps (the usual "EMA warmup").
    """

    def __init__(self, named: Iterator[tuple[str, torch.Tensor]], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {name: t.detach().float().cpu().clone() for name, t in named}

    @torch.no_grad()
    def update(self, named: Iterator[tuple[str, torch.Tensor]]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, t in named:
            self.shadow[name].mul_(d).add_(t.detach().float().cpu(), alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in self.shadow.items()}, str(path), metadata={"updates": str(self.updates)}
        )

    def load(self, path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        missing = set(self.shadow) - set(loaded)
        if missing:
            raise ValueError(f"{path}: EMA lacks {sorted(missing)[:3]}")
        self.shadow = {k: loaded[k] for k in self.shadow}
        with safe_open(str(path), framework="pt") as f:
            self.updates = int((f.metadata() or {}).get("updates", 0))


# ----------------------------------------------------------------------------------------------- engine
class Engine:
    """A DeepSpeed engine over ``model`` with torch AdamW, our lr schedule, clipping and an EMA on rank 0.

    ``trainable`` names the parameters to optimise (default: all with ``requires_grad``). The EMA lives on rank 0
    only (it is used for demos and the export); under ZeRO-3 every rank joins the gather that feeds it.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, rank: int, world_size: int, ema: bool = True) -> None:
        import deepspeed

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        ds = cfg.deepspeed
        # DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor (e.g. CLAP's logit scale) cannot be viewed
        # as: such parameters live as (1,) inside the engine and get their shape back in every state dict we hand out.
        self._scalars = {name for name, p in model.named_parameters() if p.ndim == 0}
        for name, p in model.named_parameters():
            if name in self._scalars:
                p.data = p.data.reshape(1)
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # biases, norms, scalars: no weight decay (AdamW practice)
        groups = [{"params": decay, "weight_decay": ds.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],  # ZeRO drops an empty group (LoRA: every adapter is a matrix)
            lr=ds.lr,
            betas=tuple(ds.betas),
            eps=1e-6,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, ds.warmup_steps, ds.decay, cfg.run.max_steps)
        )
        self.ds_config = deepspeed_config(ds, world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config
        )
        # Every DeepSpeed read of a checkpoint file (model, optimizer, ZeRO partitions) goes through this engine.
        self.engine.checkpoint_engine = _pickle_free_checkpoint_engine(self.engine)
        self.zero3 = ds.zero_stage == 3
        self._grad_norm: float | None = None
        self.ema: EMA | None = None
        self.keep_ema = cfg.ema.enabled and ema
        if self.keep_ema:
            with self.gathered():
                if rank == 0:
                    self.ema = EMA(self._trained(), cfg.ema.decay)

    # ------------------------------------------------------------------ stepping
    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.deepspeed.precision, torch.float32)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by :meth:`load`)."""
        return int(self.engine.global_steps)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """One micro-step; returns True when it was an optimizer step (then the EMA is updated)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.cfg.deepspeed.zero_stage == 0:
            # Without ZeRO, DeepSpeed reports no norm; the grads are already averaged across ranks here.
            grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
        self.engine.step()
        if boundary and self.keep_ema:
            with self.gathered():
                if self.ema is not None:
                    self.ema.update(self._trained())
        return boundary

    def _trained(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The parameters the optimizer moves (the EMA averages only these; frozen ones are constant)."""
        return ((name, p) for name, p in self.engine.module.named_parameters() if p.requires_grad)

    def grad_norm(self) -> float | None:
        if self.cfg.deepspeed.zero_stage == 0:
            return self._grad_norm
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def gathered(self):
        """Context in which every parameter is whole on every rank (a no-op below ZeRO-3; collective under it)."""
        import contextlib

        import deepspeed

        if not self.zero3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The live (non-EMA) weights as full CPU tensors; collective under ZeRO-3, so call it on every rank."""
        with self.gathered():
            live = {k: v.detach().float().cpu().clone() for k, v in self.engine.module.state_dict().items()}
        return self._unscalar(live)

    def _unscalar(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.reshape(()) if k in self._scalars else v for k, v in weights.items()}

    def ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights (rank 0) in the model's own shapes, or None where no EMA is kept. Frozen parameters (a
        LoRA run's base weights) come from the live model: below ZeRO-3 they are whole on rank 0."""
        if self.ema is None:
            return None
        frozen = {k: p.detach().float().cpu() for k, p in self.engine.module.named_parameters() if not p.requires_grad}
        return self._unscalar({**frozen, **self.ema.state_dict()})

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """What an export holds: the EMA weights (rank 0) where kept, else the live weights. Call on every rank."""
        live = self.full_state_dict()
        if self.ema is None:
            return live
        # Buffers are not averaged: take them from the live model.
        return {**live, **self._unscalar(self.ema.state_dict())}

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Path, state: dict[str, Any]) -> None:
        """Write this rank's part of the training state into ``directory`` (every rank calls it)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag=DS_TAG, save_latest=False)
        # DeepSpeed copies in its offline tools (zero_to_fp32.py, ...), which unpickle; our exports are safetensors.
        for script in (directory / "deepspeed").glob("zero_to_*.py"):
            script.unlink()
        if self.rank == 0:
            if self.ema is not None:
                self.ema.save(directory / EMA_FILE)
            full = {**state, "global_step": self.global_step, "world_size": self.world_size}
            (directory / STATE_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, step and EMA from a merged checkpoint directory; returns the state.

        DeepSpeed's files are read weights-only (see the module docstring), the EMA from safetensors, the state as JSON.
        """
        path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint")
        if self.ema is not None and (directory / EMA_FILE).exists():
            self.ema.load(directory / EMA_FILE)
        return json.loads((directory / STATE_FILE).read_text())

    def close(self) -> None:
        """End the rank cleanly: a barrier first, since ZeRO-3 may abort if one rank tears down while another talks."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()


def rank_seed(base: int, rank: int) -> int:
    """A distinct, reproducible seed per rank."""
    return (base * 1_000_003 + rank) % 2**31


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment DeepSpeed needs in CPU workers (it picks its accelerator at import time from this)."""
    return {} if use_gpu else {"DS_ACCELERATOR": "cpu"}


def set_cpu_threads(cpus: float) -> None:
    """Keep intra-op threads to the CPUs a worker reserved, so ranks sharing a machine don't oversubscribe it."""
    torch.set_num_threads(max(1, int(cpus)))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(cpus))))
