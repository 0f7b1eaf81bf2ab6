"""A run killed after its first checkpoint and relaunched with the same name resumes at that checkpoint's step,
in the same MLflow run: `longplay train` is SIGKILLed as a whole process group (driver and its Ray Train job)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline import storage

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _history(run_name: str, key: str) -> tuple[int, list[tuple[int, float]]]:
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=["longplay-tests"], filter_string=f"tags.`mlflow.runName` = '{run_name}'", output_format="list"
    )
    if not runs:
        return 0, []
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, key)
    return len(runs), sorted((m.step, m.value) for m in history)


def test_killed_run_relaunched_resumes_at_its_checkpoint(local_stack, latent_dataset, tmp_path):
    name = f"t-kill-{uuid.uuid4().hex[:6]}"
    checkpoints = local_stack.s3_prefix("kill-checkpoints")
    cfg = yaml.safe_load((REPO / "configs/tiny/clap.yaml").read_text())
    cfg["data"].update(shards=latent_dataset, window_seconds=1.0, shuffle_buffer=16)
    cfg["run"].update(
        name=name,
        checkpoint_uri=checkpoints,
        experiment="longplay-tests",
        max_steps=80,
        checkpoint_every=10,
        log_every=5,
    )
    cfg["deepspeed"].update(micro_batch=8, lr=1e-3, warmup_steps=5, betas=[0.9, 0.98], decay="constant")
    path = tmp_path / "clap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "infra.cli", "train", "clap", "--config", str(path)]

    first = subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    try:
        # wait until the first checkpoint is persisted and a later step has been logged
        while time.monotonic() < deadline and first.poll() is None:
            # Ray Train's bookkeeping snapshot names the checkpoint once it is registered (after its upload)
            snapshot = f"{checkpoints}/{name}/checkpoint_manager_snapshot.json"
            registered = storage.exists(snapshot) and "checkpoint_00000010" in storage.read_text(snapshot)
            steps = [s for s, _ in _history(name, "loss")[1]]
            if registered and steps and max(steps) >= 15:
                break
            time.sleep(1)
        assert first.poll() is None, "the first run ended before it could be killed: " + first.stderr.read().decode()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = max(s for s, _ in _history(name, "loss")[1])
    assert 15 <= killed_at < 80  # killed mid-run, after the registered step-10 checkpoint

    second = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    runs, resumed = _history(name, "resumed_at_step")
    assert runs == 1  # the relaunch continued the same MLflow run
    assert [v for _, v in resumed if v > 0] and min(v for _, v in resumed if v > 0) >= 10  # from a checkpoint
    steps = [s for s, _ in _history(name, "loss")[1]]
    assert max(steps) == 80 and 80 in steps
