"""Ray Train launcher: a ``TorchTrainer`` whose workers each run one DeepSpeed rank of a loop.

Checkpoints go to ``{run.checkpoint_uri}/{run.name}/`` (local or s3://) through Ray Train. Ray Train keeps a snapshot
of its checkpoint bookkeeping there, so launching again with the same run name restores the newest checkpoint, as
does a restart after a worker failure (``run.max_failures``). Workers get the service locations (S3 endpoint, region,
MLflow URI) of the launching process through their runtime environment; credentials never travel that way (see
``FORWARDED_ENV``) nor on a command line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline import allocator, storage
from pipeline.config import TrainConfig

log = logging.getLogger(__name__)

# Where the services are, forwarded to the workers. Secrets are not: Ray shows a runtime environment in its dashboard
# and state API, so credentials come from the cluster's own environment (the local stack's raylet has them; on AWS,
# instance roles; with `longplay submit`, the job's environment).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
)
CHECKPOINTS_KEPT = 2


def worker_main(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the task for ``config["train"]`` and run it, resuming from the newest checkpoint."""
    import ray.train

    from train.engine import rank_seed, set_cpu_threads
    from train.loop import RankContext

    cfg = TrainConfig.model_validate(config["train"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    context = ray.train.get_context()
    ctx = RankContext(rank=context.get_world_rank(), world_size=context.get_world_size(), report=_report)
    if not cfg.scaling.use_gpu:
        set_cpu_threads(cfg.scaling.cpus_per_worker)
    allocator.tune()  # keep freed tensor buffers in the heap (pipeline/allocator.py)
    import torch

    torch.manual_seed(rank_seed(cfg.run.seed, ctx.rank))
    storage.register_webdataset()
    checkpoint = ray.train.get_checkpoint()
    loop = _loop(cfg.kind)
    if checkpoint is None:
        loop(cfg, ctx, None)
        return
    with checkpoint.as_directory() as directory:
        loop(cfg, ctx, Path(directory))


def _loop(kind: str):
    if kind == "clap":
        from train.clap import train
    elif kind == "diffusion":
        from train.diffusion import train
    else:
        from train.vae import train
    return train


def _report(metrics: dict[str, Any], directory: Path | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
    step = int(metrics.get("step", 0))
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")


def storage_location(uri: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig: local paths as they are; s3:// through pyarrow pointed at
    ``AWS_ENDPOINT_URL`` when set (credentials stay in the environment: pyarrow reads the standard variables), with
    retries that survive Ray's pickling (see :mod:`train.checkpoint_fs`)."""
    if not storage.is_s3(uri):
        return str(Path(uri).resolve()), None
    from train.checkpoint_fs import RetryingS3FileSystem

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not endpoint:
        return uri.removeprefix("s3://"), RetryingS3FileSystem(region)
    parsed = urlparse(endpoint)
    filesystem = RetryingS3FileSystem(region, parsed.netloc or parsed.path, parsed.scheme or "https")
    return uri.removeprefix("s3://"), filesystem


def trainer(cfg: TrainConfig):
    """The TorchTrainer for ``cfg`` (not started)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from train.engine import worker_env
    from train.rendezvous import RendezvousConfig

    storage_path, filesystem = storage_location(cfg.run.checkpoint_uri)
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.update(worker_env(cfg.scaling.use_gpu))
    env["OMP_NUM_THREADS"] = str(max(1, int(cfg.scaling.cpus_per_worker)))
    env.update(allocator.child_env())  # huge pages from the worker's first tensor on (pipeline/allocator.py)
    return TorchTrainer(
        worker_main,
        train_loop_config={"train": cfg.model_dump(mode="json")},
        torch_config=RendezvousConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),  # loopback stays loopback
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            worker_runtime_env={"env_vars": env},
        ),
    )


def launch(cfg: TrainConfig):
    """Connect to Ray (``RAY_ADDRESS`` or a local instance) and train; returns Ray Train's ``Result``."""
    from pipeline import cluster

    cluster.connect()
    return trainer(cfg).fit()
