"""What the local stack's commands share: its recorded state (``STATE/stack.json``), credentials and environment,
service health, and the environment and private folders of its Ray nodes (the head here, joined ones in
:mod:`infra.raynode`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.processes import HOST, StackError, bin_path, http_ok, leader_alive, owns_port

BUCKET = "longplay"
REGION = "us-east-1"
PREFERRED = {"s3": 8333, "mlflow": 5000, "ray_gcs": 6379, "ray_dashboard": 8265, "ray_client": 10001}
# SeaweedFS mini opens these besides S3; each gets a free port so two stacks never collide.
WEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)
# Ray's fixed-default ports (the dashboard agent's 52365 above all) would collide between two stacks on one
# machine; each gets a free port, and the agent that serves job submission then always comes up.
RAY_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)
SERVICES = ("s3", "mlflow", "ray")
# Local services never phone home (SeaweedFS: -master.telemetry=false; Ray: --disable-usage-stats; MLflow: these).
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@dataclass
class StackState:
    """What ``up`` recorded: enough for ``status`` and ``down`` (no secrets)."""

    ports: dict[str, int] = field(default_factory=dict)
    pgids: dict[str, int] = field(default_factory=dict)
    ray_temp_dir: str = ""  # the head's private folder (0700), holding Ray's --temp-dir as ray/
    # joined Ray nodes: name ("node1", ...) → {"pgid": process group, "temp_dir": its private folder, "ports": {...}}
    nodes: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path) -> StackState:
        path = state_dir / "stack.json"
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, state_dir: Path) -> None:
        tmp = state_dir / "stack.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(state_dir / "stack.json")


# ----------------------------------------------------------------------------------------------- credentials
def credentials(state_dir: Path) -> tuple[str, str]:
    path = state_dir / "credentials.json"
    if path.exists():
        creds = json.loads(path.read_text())
        return creds["access_key"], creds["secret_key"]
    access, secret = "LP" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    write_private(path, json.dumps({"access_key": access, "secret_key": secret}))
    return access, secret


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def stack_env(state_dir: Path) -> dict[str, str]:
    """The standard variables that point every longplay command (and boto3, MLflow, Ray) at this stack."""
    state = StackState.load(state_dir)
    if not state.ports:
        raise StackError(f"no stack recorded under {state_dir}; run `longplay stack up`")
    access, secret = credentials(state_dir)
    s3 = f"http://{HOST}:{state.ports['s3']}"
    return {
        "AWS_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": REGION,
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{state.ports['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "RAY_ADDRESS": f"{HOST}:{state.ports['ray_gcs']}",
    }


def export_block(env: dict[str, str]) -> str:
    return "\n".join(f"export {key}={value}" for key, value in env.items())


# ----------------------------------------------------------------------------------------------- health
def _tcp_open(state: StackState, name: str) -> bool:
    try:
        with socket.create_connection((HOST, state.ports[name]), timeout=1.0):
            return True
    except OSError:
        return False


def health(state_dir: Path) -> dict[str, bool]:
    """Service name → healthy: its process group owns its port and its endpoint answers."""
    state = StackState.load(state_dir)
    return {name: healthy(state, name) for name in SERVICES}


def healthy(state: StackState, name: str) -> bool:
    pgid = state.pgids.get(name)
    port_name = {"s3": "s3", "mlflow": "mlflow", "ray": "ray_dashboard"}[name]
    if pgid is None or port_name not in state.ports or not owns_port(pgid, state.ports[port_name]):
        return False
    if name == "s3":
        return _tcp_open(state, "s3")
    if name == "mlflow":
        return http_ok(f"http://{HOST}:{state.ports['mlflow']}/health")
    # GCS and dashboard can come up while the raylet does not (seen under load: `ray start` then exits with "node
    # timed out during startup" and every client hangs): the raylet's port and a live `ray start` count too.
    return (
        leader_alive(pgid)
        and owns_port(pgid, state.ports["ray_gcs"])
        and owns_port(pgid, state.ports["ray_node-manager-port"])
        and http_ok(f"http://{HOST}:{state.ports['ray_dashboard']}/api/version", _ray_auth_header())
    )


def _ray_auth_header() -> dict[str, str]:
    token_path = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token_path.read_text().strip()}"} if token_path.exists() else {}


# ----------------------------------------------------------------------------------------------- Ray nodes
def ensure_ray_token() -> None:
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        # Ray writes it with the default mode (0644 under umask 022): umask 077 makes it 0600, ~/.ray 0700, at once
        cmd = [bin_path("ray"), "get-auth-token", "--generate"]
        subprocess.run(cmd, check=True, capture_output=True, umask=0o077)  # noqa: S603
    os.chmod(token, 0o600)  # a token an older version (or Ray) wrote


def ray_env(state_dir: Path) -> dict[str, str]:
    """The environment of every Ray node of the stack (head and joined), inherited by its workers and job drivers."""
    env = {
        **os.environ,
        **stack_env(state_dir),
        # Single-machine mode: the node IP stays 127.0.0.1, so GCS and raylet bind loopback only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        **NO_TELEMETRY,  # inherited by every Ray worker and job driver of the stack
        # Job drivers find `python` and `longplay` of this installation first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS")
    return env


def private_dir(previous: str = "") -> str:
    """A new folder only this user can enter, for one Ray node's files; ``previous`` (the last start's) is removed.

    ``mkdtemp`` creates it atomically 0700, owned by us, under a random name: Ray makes its ``--temp-dir`` 0777, and
    a predictable path in a shared /tmp let another local user create it first or swap a job's unpacked working_dir.
    Ray gets ``ray/`` inside it (:func:`ray_temp`). It is under /tmp, not $TMPDIR, because Ray's unix socket paths
    live below it and must stay short.
    """
    if previous:
        shutil.rmtree(previous, ignore_errors=True)
    return tempfile.mkdtemp(prefix="lp-", dir="/tmp")  # noqa: S108


def ray_temp(private_dir: str) -> str:
    return os.path.join(private_dir, "ray")
