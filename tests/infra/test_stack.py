"""The local stack: loopback-only ports, idempotent `up`, `down` that leaves nothing behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import psutil
import pytest

from infra import raynode, stack, stackstate

pytestmark = pytest.mark.stack

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            out.append((conn.pid, conn.laddr.ip, conn.laddr.port))
    return out


def test_every_port_of_the_stack_is_loopback_only(local_stack):
    listening = _listening(stack.listening_pids(local_stack.state_dir))
    ports = {port for _, _, port in listening}
    state = local_stack.state
    for name in ("s3", "mlflow", "ray_gcs", "ray_dashboard"):
        assert state.ports[name] in ports, f"{name} is not listening"
    assert len(listening) >= 8  # S3 + its internal servers, MLflow, GCS, raylet, dashboard, agents
    exposed = [(pid, ip, port) for pid, ip, port in listening if ip not in LOOPBACK]
    assert exposed == []


def test_up_is_idempotent_and_secrets_stay_private(local_stack):
    before = dict(local_stack.state.pgids)
    env = stack.up(local_stack.state_dir)
    assert env == local_stack.env
    assert local_stack.state.pgids == before  # nothing restarted
    assert set(env) == {
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "RAY_ADDRESS",
    }
    for name in ("credentials.json", "credentials.env", "s3.json"):
        mode = stat.S_IMODE((local_stack.state_dir / name).stat().st_mode)
        assert mode == 0o600, name
    secret = env["AWS_SECRET_ACCESS_KEY"]
    for log in (local_stack.state_dir / "logs").iterdir():
        assert secret not in log.read_text(errors="replace"), f"secret leaked into {log.name}"
    assert secret not in (local_stack.state_dir / "stack.json").read_text()


def test_ray_token_is_created_private(tmp_path, monkeypatch):
    """Issue 15 item 15: the token is 0600 from the moment Ray writes it, not only after our chmod (before: 0644)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # Path.home() here, ~ for the ray CLI
    monkeypatch.setattr(stackstate.os, "chmod", lambda *args: None)  # see the mode Ray's own write left
    umask = os.umask(0o022)  # the usual default, under which the token used to be world-readable
    try:
        stackstate.ensure_ray_token()
    finally:
        os.umask(umask)
    token = tmp_path / ".ray" / "auth_token"
    assert len(token.read_text().strip()) >= 32
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def _private(path: str) -> None:
    info = os.lstat(path)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid(), path
    assert stat.S_IMODE(info.st_mode) == 0o700, f"{path}: {oct(info.st_mode)}"


def test_ray_files_live_in_a_private_folder(local_stack):
    """Issue 15 item 13: the head's and a joined node's Ray temp dirs (Ray makes them 0777) sit in folders that are
    0700, ours, and named at random (before: /tmp/lp-<hash of the state dir>, itself 0777)."""
    import hashlib

    state = local_stack.state
    predictable = f"/tmp/lp-{hashlib.sha256(str(local_stack.state_dir.resolve()).encode()).hexdigest()[:8]}"
    assert state.ray_temp_dir != predictable
    _private(state.ray_temp_dir)
    assert os.path.isdir(os.path.join(state.ray_temp_dir, "ray", "session_latest"))  # Ray's files are in there
    name = raynode.join(local_stack.state_dir, num_cpus=1)
    try:
        node_dir = local_stack.state.nodes[name]["temp_dir"]
        _private(node_dir)
        assert os.path.isdir(os.path.join(node_dir, "ray")) and node_dir != state.ray_temp_dir
    finally:
        raynode.leave(local_stack.state_dir, name)
    assert not os.path.exists(node_dir)


def test_status_command_reports_healthy(local_stack):
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", "stack", "status", "--state-dir", str(local_stack.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("healthy") == 3


def test_ray_job_runs_on_the_stack(local_stack):
    from pipeline import cluster

    client = cluster.job_client()
    entry = "python -c \"import ray; ray.init(); print('CPUS', ray.cluster_resources()['CPU'])\""
    job = cluster.submit_job(client, entrypoint=entry)
    import time

    deadline = time.monotonic() + 300
    while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    assert str(client.get_job_status(job)) == "SUCCEEDED"
    assert "CPUS 2.0" in client.get_job_logs(job)


def test_down_leaves_no_process_and_no_port(tmp_path):
    """A second, throwaway stack: up, check it serves, down, check nothing of it remains."""
    state_dir = tmp_path / "stack2"
    try:
        env = stack.up(state_dir, num_cpus=1, preferred_ports=False)
        state = stack.StackState.load(state_dir)
        pids = stack.listening_pids(state_dir)
        ports = set(state.ports.values())
        assert pids and all(stack.health(state_dir).values())
        assert env["AWS_ENDPOINT_URL"].endswith(str(state.ports["s3"]))
        assert sorted(stack.down(state_dir)) == ["mlflow", "ray", "s3"]
    finally:
        stack.down(state_dir)  # a failed assertion above must not leak a stack
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    still_listening = [c for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.laddr.port in ports]
    assert still_listening == []
    assert not os.path.exists(state.ray_temp_dir)
    assert stack.StackState.load(state_dir).pgids == {}
