"""End to end on the real local stack (S3, MLflow, Ray head with 2 CPUs): tiny presets, 2 Ray Train workers, gloo.

One module-scoped chain keeps the cost down (each launch pays ~30-50 s of worker start-up on 2 cores):
CLAP under ZeRO-2 → relaunched with more steps (resumes) → diffusion under ZeRO-3 conditioned on the registered
CLAP, with a worker killed after its first checkpoint (Ray Train restarts it from there).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pipeline import storage

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _runs(name: str):
    import mlflow

    return mlflow.search_runs(
        experiment_names=["longplay-tests"], filter_string=f"tags.`mlflow.runName` = '{name}'", output_format="list"
    )


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client().get_metric_history(run_id, key))


def _artifacts(run_id: str, path: str = "") -> list[str]:
    out = []
    for item in _client().list_artifacts(run_id, path):
        out += _artifacts(run_id, item.path) if item.is_dir else [item.path]
    return out


@pytest.fixture(scope="module")
def clap_run(local_stack, ray_on_stack, latent_dataset, train_config):
    from train.launch import launch

    checkpoints = local_stack.s3_prefix("checkpoints")
    cfg = train_config(
        "clap",
        latent_dataset,
        checkpoints,
        "t-clap",
        run__max_steps=20,
        run__checkpoint_every=10,
        deepspeed__zero_stage=2,
    )
    result = launch(cfg)
    assert result.error is None, result.error
    return cfg, result


def test_clap_trains_logs_checkpoints_and_registers(clap_run) -> None:
    cfg, result = clap_run
    (run,) = _runs("t-clap")
    loss = _history(run.info.run_id, "loss")
    assert [s for s, _ in loss] == [5, 10, 15, 20]
    assert loss[-1][1] < loss[0][1], loss
    for key in ("lr", "grad_norm", "samples_per_s", "data_wait_fraction", "recall_at_1", "recall_at_10"):
        assert _history(run.info.run_id, key), key
    assert run.data.params["deepspeed.zero_stage"] == "2"
    assert {"git_sha", "shard_index_hash", "vae_id"} <= set(run.data.tags)
    ckpts = [u for u in storage.list_uris(storage.join(cfg.run.checkpoint_uri, "t-clap")) if "trainer_state" in u]
    assert {u.split("/")[-2] for u in ckpts} == {"checkpoint_00000010", "checkpoint_00000020"}
    assert {"model/model.safetensors", "model/tokenizer.json", "model/config.json"} <= set(_artifacts(run.info.run_id))
    version = _client().get_model_version_by_alias("t-clap", "current")
    assert version.run_id == run.info.run_id


def test_relaunch_with_the_same_name_resumes(clap_run, train_config) -> None:
    """The finished run relaunched with more steps resumes at its newest checkpoint, in the same MLflow run."""
    from train.launch import launch

    cfg, first = clap_run
    lr_before = dict(_history(_runs("t-clap")[0].info.run_id, "lr"))
    cfg2 = cfg.model_copy(update={"run": cfg.run.model_copy(update={"max_steps": 25})})
    result = launch(cfg2)
    assert result.error is None, result.error
    (run,) = _runs("t-clap")  # one MLflow run, continued
    assert dict(_history(run.info.run_id, "resumed_at_step"))[20] == 20
    steps = [s for s, _ in _history(run.info.run_id, "loss")]
    assert steps == [5, 10, 15, 20, 25]
    # optimizer + scheduler state came back: the lr schedule continued (constant after warmup), no new warmup
    lr = dict(_history(run.info.run_id, "lr"))
    assert lr[25] == pytest.approx(lr_before[20])
    assert result.metrics["step"] == 25


def _kill_one_worker_after(
    run_name: str, step: int, stop: threading.Event, snapshot: str, checkpoint: str
) -> list[int]:
    """Once the run has logged ``step`` and Ray Train's snapshot names ``checkpoint`` (registered, so a restart
    resumes from it), SIGKILL one Ray Train worker."""
    from ray.util.state import list_actors

    killed: list[int] = []

    def logged_step() -> int:
        runs = _runs(run_name)
        return max((s for s, _ in _history(runs[0].info.run_id, "loss")), default=0) if runs else 0

    def registered() -> bool:
        return storage.exists(snapshot) and checkpoint in storage.read_text(snapshot)

    def watch() -> None:
        while not stop.is_set():
            if logged_step() >= step and registered():
                actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                pids = sorted(a.pid for a in actors if a.pid)
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_diffusion_zero3_from_registered_clap_survives_a_killed_worker(
    clap_run, local_stack, latent_dataset, train_config
) -> None:
    from train.launch import launch

    clap_cfg, _ = clap_run
    checkpoints = clap_cfg.run.checkpoint_uri
    cfg = train_config(
        "diffusion",
        latent_dataset,
        checkpoints,
        "t-diffusion",
        run__max_steps=30,
        run__checkpoint_every=10,
        run__demo_every=30,
        run__max_failures=1,
        deepspeed__zero_stage=3,
        model__clap="models:/t-clap@latest",
        deepspeed__lr=3e-3,
    )
    stop = threading.Event()
    snapshot = storage.join(checkpoints, "t-diffusion", "checkpoint_manager_snapshot.json")
    killed = _kill_one_worker_after("t-diffusion", 15, stop, snapshot, "checkpoint_00000010")
    try:
        result = launch(cfg)
    finally:
        stop.set()
    assert result.error is None, result.error
    assert killed, "no worker was killed"
    (run,) = _runs("t-diffusion")
    resumed = dict(_history(run.info.run_id, "resumed_at_step"))
    assert 0 in resumed and any(step >= 10 for step in resumed), resumed  # restarted from a checkpoint, same run
    loss = _history(run.info.run_id, "loss")
    assert loss[-1][0] == 30 and loss[-1][1] < loss[0][1], loss
    artifacts = _artifacts(run.info.run_id)
    assert any(a.startswith("demo/") and a.endswith(".wav") for a in artifacts), artifacts
    assert any(a.startswith("demo/") and a.endswith(".png") for a in artifacts), artifacts
    assert {"model/model.safetensors", "model/clap/model.safetensors", "model/autoencoder/config.json"} <= set(
        artifacts
    )
    assert run.data.params["deepspeed.zero_stage"] == "3"
    version = _client().get_model_version_by_alias("t-diffusion", "current")
    assert version.run_id == run.info.run_id
