"""The local service stack: SeaweedFS S3, an MLflow tracking server and a Ray head, all on 127.0.0.1.

``up`` starts what is not running (idempotent) and returns the standard variables every longplay command reads;
``down`` stops exactly the process groups ``up`` started (recorded in ``STATE/stack.json``); ``status`` checks
health. State lives under one directory (default ``.longplay/``)::

    .longplay/
      stack.json        ports and process-group ids (no secrets)
      credentials.env   the export block, secrets included (mode 0600)
      s3.json           SeaweedFS identity config (mode 0600)
      s3/ mlflow.db     object data, MLflow backend store
      logs/             one log per service

Each service runs in its own session (``start_new_session``), so its whole process tree shares one process group
and ``down`` can signal that group and nothing else. The Ray auth token is Ray's own: ``~/.ray/auth_token``,
generated with ``ray get-auth-token --generate`` when missing, found by every Ray client on this machine.

``join`` adds a second (third, ...) Ray node on this machine: its own raylet, object store, agents, ports and temp
dir, also on 127.0.0.1, joined to the head with the same token and environment (``infra.raynode`` explains why plain
``ray start --address`` cannot keep 127.0.0.1). ``leave`` (and ``down``) stop the nodes ``join`` started.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from infra.processes import (
    HOST,
    bin_path,
    free_port,
    group_alive,
    group_members,
    pick_port,
    spawn,
    stop_group,
    wait_healthy,
)
from infra.processes import StackError as StackError  # re-exported: callers of up/down catch it
from infra.raynode import leave
from infra.stackstate import (
    BUCKET,
    NO_TELEMETRY,
    PREFERRED,
    RAY_PORTS,
    SERVICES,
    WEED_PORTS,
    StackState,
    credentials,
    ensure_ray_token,
    export_block,
    health,
    healthy,
    private_dir,
    ray_env,
    ray_temp,
    stack_env,
    write_private,
)

__all__ = [  # what callers use: up/down and, re-exported, the state, environment and health they read
    "BUCKET",
    "NO_TELEMETRY",
    "StackError",
    "StackState",
    "down",
    "export_block",
    "health",
    "listening_pids",
    "stack_env",
    "up",
]


# ----------------------------------------------------------------------------------------------- up / down
def _start_s3(state_dir: Path, state: StackState, access: str, secret: str) -> None:
    identities = {
        "identities": [
            {
                "name": "longplay",
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    write_private(state_dir / "s3.json", json.dumps(identities))
    (state_dir / "s3").mkdir(exist_ok=True)
    cmd = [
        bin_path("weed"),
        "mini",
        f"-dir={state_dir / 's3'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        f"-s3.config={state_dir / 's3.json'}",
        f"-s3.port={state.ports['s3']}",
        f"-bucket={BUCKET}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.volumeSizeLimitMB=256",
    ]
    cmd += [f"-{flag}={state.ports['s3_' + flag]}" for flag in WEED_PORTS]
    log = state_dir / "logs" / "s3.log"
    state.pgids["s3"] = spawn(cmd, log, dict(os.environ))
    state.save(state_dir)
    bucket_ready = _bucket_probe(state_dir)
    wait_healthy("SeaweedFS S3", lambda: healthy(state, "s3") and bucket_ready(), 120, state.pgids["s3"], log)


def _bucket_probe(state_dir: Path):
    """A check, polled until it passes: the stack's bucket answers with our credentials (created if SeaweedFS has
    not yet). One short try per call, no retries. The client is built once, from the stack's values directly, so
    this process's environment and ``pipeline.storage``'s cached client stay untouched."""
    import boto3
    from botocore.config import Config

    env = stack_env(state_dir)
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )

    def ready() -> bool:
        try:
            client.head_bucket(Bucket=BUCKET)
            return True
        except Exception:  # noqa: BLE001 - not ready yet, whatever the reason; the caller polls until its deadline
            try:
                client.create_bucket(Bucket=BUCKET)
                return True
            except Exception:  # noqa: BLE001
                return False

    return ready


def _start_mlflow(state_dir: Path, state: StackState) -> None:
    env = {**os.environ, **stack_env(state_dir), **NO_TELEMETRY, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        bin_path("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(state.ports["mlflow"]),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{(state_dir / 'mlflow.db').resolve()}",
        "--artifacts-destination",
        f"s3://{BUCKET}/mlflow-artifacts",
        "--serve-artifacts",
    ]
    log = state_dir / "logs" / "mlflow.log"
    state.pgids["mlflow"] = spawn(cmd, log, env)
    state.save(state_dir)
    wait_healthy("MLflow", lambda: healthy(state, "mlflow"), 180, state.pgids["mlflow"], log)


def _start_ray(state_dir: Path, state: StackState, num_cpus: int | None) -> None:
    ensure_ray_token()
    state.ray_temp_dir = private_dir(state.ray_temp_dir)
    cmd = [
        bin_path("ray"),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={HOST}",
        f"--port={state.ports['ray_gcs']}",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={state.ports['ray_dashboard']}",
        f"--ray-client-server-port={state.ports['ray_client']}",
        f"--temp-dir={ray_temp(state.ray_temp_dir)}",
        f"--num-cpus={num_cpus or os.cpu_count() or 2}",
        "--include-dashboard=true",
        "--disable-usage-stats",
        *(f"--{flag}={state.ports['ray_' + flag]}" for flag in RAY_PORTS),
    ]
    log = state_dir / "logs" / "ray.log"
    state.pgids["ray"] = spawn(cmd, log, ray_env(state_dir))
    state.save(state_dir)
    wait_healthy("Ray head", lambda: healthy(state, "ray"), 180, state.pgids["ray"], log)


def _allocate_ports(state: StackState, restart: set[str], fresh: bool = False, preferred: bool = True) -> None:
    """Give every service in ``restart`` its ports (preferred ones when free); keep the healthy ones' ports.

    A restarted service keeps its old ports when they are free, so exported endpoints stay valid; ``fresh``
    picks new ones instead (after a start lost a race for a port with another process).
    """
    previous = {n: p for n, p in state.ports.items() if n.split("_")[0] in restart}
    taken = {port for name, port in state.ports.items() if name not in previous}
    if fresh:
        taken |= set(previous.values())
        previous = {}
    names = [n for n in PREFERRED if n.split("_")[0] in restart]
    if "s3" in restart:
        names += [f"s3_{flag}" for flag in WEED_PORTS]
    if "ray" in restart:
        names += [f"ray_{flag}" for flag in RAY_PORTS]
    for name in names:
        wish = previous.get(name) or (PREFERRED.get(name) if preferred else None) or free_port(taken)
        state.ports[name] = pick_port(wish, taken)


def up(state_dir: Path, num_cpus: int | None = None, preferred_ports: bool = True) -> dict[str, str]:
    """Start whatever is not healthy; return the standard environment for the stack.

    ``preferred_ports=False`` (tests) takes free ports only, leaving 8333/5000/6379/8265 to a developer's stack.
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    state = StackState.load(state_dir)
    healthy = health(state_dir) if state.ports else dict.fromkeys(SERVICES, False)
    restart = {name for name, ok in healthy.items() if not ok}
    for name in restart:
        stop_group(state.pgids.pop(name, None))
    _allocate_ports(state, restart, preferred=preferred_ports)
    state.save(state_dir)
    access, secret = credentials(state_dir)
    starters = {
        "s3": lambda: _start_s3(state_dir, state, access, secret),
        "mlflow": lambda: _start_mlflow(state_dir, state),
        "ray": lambda: _start_ray(state_dir, state, num_cpus),
    }
    for name in SERVICES:
        if name not in restart:
            continue
        for attempt in range(3):
            try:
                starters[name]()
                break
            except StackError:
                # Free ports are picked before the service binds them: another process may win the race.
                stop_group(state.pgids.pop(name, None))
                if attempt == 2:
                    raise
                _allocate_ports(state, {name}, fresh=True, preferred=preferred_ports)
                state.save(state_dir)
    state.save(state_dir)
    env = stack_env(state_dir)
    write_private(state_dir / "credentials.env", export_block(env) + "\n")
    return env


def down(state_dir: Path) -> list[str]:
    """Stop the nodes ``join`` added and the services ``up`` started under ``state_dir``; returns the names stopped."""
    state_dir = state_dir.resolve()
    stopped = leave(state_dir)  # joined nodes before the head they belong to
    state = StackState.load(state_dir)
    for name in reversed(SERVICES):  # Ray first: its jobs may still write to S3 and MLflow
        pgid = state.pgids.pop(name, None)
        if pgid is not None and group_alive(pgid):
            stop_group(pgid)
            stopped.append(name)
    if state.ray_temp_dir:
        shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
    state.save(state_dir)
    return stopped


def listening_pids(state_dir: Path) -> set[int]:
    """Every live pid in the stack's process groups (for tests and ``status``)."""
    state = StackState.load(state_dir.resolve())
    pgids = [*state.pgids.values(), *(node["pgid"] for node in state.nodes.values())]
    return {pid for pgid in pgids for pid in group_members(pgid)}
