"""pipeline.tracking.Tracker while the MLflow server goes away and comes back (issue 15 item 9).

A private ``mlflow server`` (sqlite in tmp_path, its own process group, a free 127.0.0.1 port) is started, killed and
started again on the same port and database by the test; the client's own retries are cut to none so that "longer
than the client retries" takes seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from infra import stack
from pipeline import tracking

pytestmark = pytest.mark.slow


def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path)]
    env = {**os.environ, **stack.NO_TELEMETRY, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "server.log", "ab")  # noqa: SIM115 - the server process owns it
    server = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise RuntimeError((tmp_path / "server.log").read_text()[-2000:])


def _kill(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # a crash, not a graceful stop
    server.wait(timeout=30)


def test_metrics_wait_for_a_server_that_went_away_and_go_to_the_same_run(tmp_path, monkeypatch, caplog):
    """Before: log_metrics raised (MlflowException: connection refused) and the training worker died with it."""
    import mlflow

    port = stack.free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    # An earlier test may have set MLflow's process-wide URI (it wins over the variable): point it here, put it back.
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(tracking.Tracker, "MAX_BUFFERED", 8, raising=False)  # two values per step below
    server = _start_server(tmp_path, port)
    try:
        tracker = tracking.Tracker(enabled=True)
        tracker.start("outage", "r", system_metrics=False)
        tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=1)
        assert getattr(tracker, "flush", lambda timeout: True)(30)  # sent before the crash (a no-op when synchronous)
        _kill(server)
        for step in range(2, 8):  # the server is down: each call returns at once
            t0 = time.monotonic()
            tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
            assert time.monotonic() - t0 < 0.5
            time.sleep(0.3)
        assert tracker.dropped == 4 and "dropping the oldest" in caplog.text  # steps 2 and 3 went first
        server = _start_server(tmp_path, port)
        tracker.end()
        client = mlflow.MlflowClient()
        (run,) = client.search_runs([mlflow.get_experiment_by_name("outage").experiment_id])
        assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        assert history == [(s, pytest.approx(1.0 / s)) for s in (1, 4, 5, 6, 7)]
    finally:
        _kill(server)
        if mlflow.active_run() is not None:  # a failure above must not leave this run active for later tests
            with contextlib.suppress(Exception):  # best effort: the server may be the one that is down
                mlflow.end_run()
        mlflow.set_tracking_uri(previous_uri)
