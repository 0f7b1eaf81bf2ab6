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
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUCKET = "longplay"
HOST = "127.0.0.1"
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


class StackError(RuntimeError):
    pass


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


# ----------------------------------------------------------------------------------------------- helpers
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port(avoid: set[int] = frozenset()) -> int:
    """A free TCP port on 127.0.0.1 outside Ray's worker range (10002-19999)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in avoid and not 10002 <= port <= 19999 and port + 10000 not in avoid:
            return port
    raise StackError("no free port found on 127.0.0.1")


def _pick(preferred: int, taken: set[int]) -> int:
    port = preferred if preferred not in taken and _port_free(preferred) else free_port(taken)
    taken.add(port)
    return port


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = stat_fields[0], int(stat_fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _group_alive(pgid: int) -> bool:
    try:  # reap the group leader if it is our own exited child, so it does not linger as a zombie
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    return bool(_group_members(pgid))


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4 or IPv6), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(fields[9])
    return inodes


def _owns_port(pgid: int, port: int) -> bool:
    """Whether a live process of group ``pgid`` holds the listening socket on ``port``.

    Health checks use it so that another stack (or anything else) answering on a port we picked never passes
    for our service.
    """
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return False
    for pid in _group_members(pgid):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    return True
            except OSError:
                continue
    return False


def _http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
            return 200 <= resp.status < 300
    except Exception:
        return False


def _bin(name: str) -> str:
    """A console script installed beside this interpreter (the venv), else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name}: not installed (run `make install`)")
    return found


def _wait(what: str, check, timeout: float, pgid: int, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not _group_alive(pgid) or not _leader_alive(pgid):  # the process we started has exited: no wait helps
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
    raise StackError(f"{what} did not become healthy; last log lines:\n" + "\n".join(tail))


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return proc.pid  # == its process group id (new session)


# ----------------------------------------------------------------------------------------------- credentials
def _credentials(state_dir: Path) -> tuple[str, str]:
    path = state_dir / "credentials.json"
    if path.exists():
        creds = json.loads(path.read_text())
        return creds["access_key"], creds["secret_key"]
    access, secret = "LP" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    _write_private(path, json.dumps({"access_key": access, "secret_key": secret}))
    return access, secret


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def stack_env(state_dir: Path) -> dict[str, str]:
    """The standard variables that point every longplay command (and boto3, MLflow, Ray) at this stack."""
    state = StackState.load(state_dir)
    if not state.ports:
        raise StackError(f"no stack recorded under {state_dir}; run `longplay stack up`")
    access, secret = _credentials(state_dir)
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
    return {name: _healthy(state, name) for name in SERVICES}


def _healthy(state: StackState, name: str) -> bool:
    pgid = state.pgids.get(name)
    port_name = {"s3": "s3", "mlflow": "mlflow", "ray": "ray_dashboard"}[name]
    if pgid is None or port_name not in state.ports or not _owns_port(pgid, state.ports[port_name]):
        return False
    if name == "s3":
        return _tcp_open(state, "s3")
    if name == "mlflow":
        return _http_ok(f"http://{HOST}:{state.ports['mlflow']}/health")
    # GCS and dashboard can come up while the raylet does not (seen under load: `ray start` then exits with "node
    # timed out during startup" and every client hangs): the raylet's port and a live `ray start` count too.
    return (
        _leader_alive(pgid)
        and _owns_port(pgid, state.ports["ray_gcs"])
        and _owns_port(pgid, state.ports["ray_node-manager-port"])
        and _http_ok(f"http://{HOST}:{state.ports['ray_dashboard']}/api/version", _ray_auth_header())
    )


def _leader_alive(pgid: int) -> bool:
    """The group's leader (the process we spawned) still runs: not exited, not a zombie."""
    try:
        state = (Path("/proc") / str(pgid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _ray_auth_header() -> dict[str, str]:
    token_path = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token_path.read_text().strip()}"} if token_path.exists() else {}


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
    _write_private(state_dir / "s3.json", json.dumps(identities))
    (state_dir / "s3").mkdir(exist_ok=True)
    cmd = [
        _bin("weed"),
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
    state.pgids["s3"] = _spawn(cmd, log, dict(os.environ))
    state.save(state_dir)
    bucket_ready = _bucket_probe(state_dir)
    _wait("SeaweedFS S3", lambda: _healthy(state, "s3") and bucket_ready(), 120, state.pgids["s3"], log)


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
        _bin("mlflow"),
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
    state.pgids["mlflow"] = _spawn(cmd, log, env)
    state.save(state_dir)
    _wait("MLflow", lambda: _healthy(state, "mlflow"), 180, state.pgids["mlflow"], log)


def _ensure_ray_token() -> None:
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        # Ray writes it with the default mode (0644 under umask 022): umask 077 makes it 0600, ~/.ray 0700, at once
        cmd = [_bin("ray"), "get-auth-token", "--generate"]
        subprocess.run(cmd, check=True, capture_output=True, umask=0o077)  # noqa: S603
    os.chmod(token, 0o600)  # a token an older version (or Ray) wrote


def _ray_env(state_dir: Path) -> dict[str, str]:
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


def _private_dir(previous: str = "") -> str:
    """A new folder only this user can enter, for one Ray node's files; ``previous`` (the last start's) is removed.

    ``mkdtemp`` creates it atomically 0700, owned by us, under a random name: Ray makes its ``--temp-dir`` 0777, and
    a predictable path in a shared /tmp let another local user create it first or swap a job's unpacked working_dir.
    Ray gets ``ray/`` inside it (:func:`_ray_temp`). It is under /tmp, not $TMPDIR, because Ray's unix socket paths
    live below it and must stay short.
    """
    if previous:
        shutil.rmtree(previous, ignore_errors=True)
    return tempfile.mkdtemp(prefix="lp-", dir="/tmp")  # noqa: S108


def _ray_temp(private_dir: str) -> str:
    return os.path.join(private_dir, "ray")


def _start_ray(state_dir: Path, state: StackState, num_cpus: int | None) -> None:
    _ensure_ray_token()
    state.ray_temp_dir = _private_dir(state.ray_temp_dir)
    cmd = [
        _bin("ray"),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={HOST}",
        f"--port={state.ports['ray_gcs']}",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={state.ports['ray_dashboard']}",
        f"--ray-client-server-port={state.ports['ray_client']}",
        f"--temp-dir={_ray_temp(state.ray_temp_dir)}",
        f"--num-cpus={num_cpus or os.cpu_count() or 2}",
        "--include-dashboard=true",
        "--disable-usage-stats",
        *(f"--{flag}={state.ports['ray_' + flag]}" for flag in RAY_PORTS),
    ]
    log = state_dir / "logs" / "ray.log"
    state.pgids["ray"] = _spawn(cmd, log, _ray_env(state_dir))
    state.save(state_dir)
    _wait("Ray head", lambda: _healthy(state, "ray"), 180, state.pgids["ray"], log)


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
        state.ports[name] = _pick(wish, taken)


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
        _stop_group(state.pgids.pop(name, None))
    _allocate_ports(state, restart, preferred=preferred_ports)
    state.save(state_dir)
    access, secret = _credentials(state_dir)
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
                _stop_group(state.pgids.pop(name, None))
                if attempt == 2:
                    raise
                _allocate_ports(state, {name}, fresh=True, preferred=preferred_ports)
                state.save(state_dir)
    state.save(state_dir)
    env = stack_env(state_dir)
    _write_private(state_dir / "credentials.env", export_block(env) + "\n")
    return env


def _stop_group(pgid: int | None, timeout: float = 8.0) -> None:
    """SIGTERM the group leader (it shuts its own children down in order), then SIGKILL whatever remains."""
    if pgid is None or not _group_alive(pgid):
        return
    try:
        os.kill(pgid, signal.SIGTERM)
    except ProcessLookupError:  # the leader is gone but members remain: signal them all
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
        while _group_alive(pgid):
            time.sleep(0.1)


def down(state_dir: Path) -> list[str]:
    """Stop the nodes ``join`` added and the services ``up`` started under ``state_dir``; returns the names stopped."""
    state_dir = state_dir.resolve()
    stopped = leave(state_dir)  # joined nodes before the head they belong to
    state = StackState.load(state_dir)
    for name in reversed(SERVICES):  # Ray first: its jobs may still write to S3 and MLflow
        pgid = state.pgids.pop(name, None)
        if pgid is not None and _group_alive(pgid):
            _stop_group(pgid)
            stopped.append(name)
    if state.ray_temp_dir:
        shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
    state.save(state_dir)
    return stopped


# ----------------------------------------------------------------------------------------------- joined nodes
def join(state_dir: Path, num_cpus: int = 1) -> str:
    """Start one more Ray node on this machine, joined to the stack's head; return its name (``node1``, ...).

    The node gets its own raylet, object store, agents, free ports and temp dir, all on 127.0.0.1, and the head's
    environment (endpoints, credentials, single-machine mode); the token is Ray's own ``~/.ray/auth_token``. On a
    real cluster the same is ``ray start --address=HEAD:6379`` on another machine.
    """
    state_dir = state_dir.resolve()
    state = StackState.load(state_dir)
    if not state.ports or not _healthy(state, "ray"):
        raise StackError(f"no healthy Ray head under {state_dir}; run `longplay stack up` first")
    number = 1 + max((int(n.removeprefix("node")) for n in state.nodes), default=0)
    name = f"node{number}"
    node = {"pgid": 0, "temp_dir": _private_dir(), "ports": {}}
    log = state_dir / "logs" / f"ray-{name}.log"
    for attempt in range(3):  # free ports are picked before the raylet binds them: another process may win the race
        taken = set(state.ports.values()) | {p for n in state.nodes.values() for p in n["ports"].values()}
        for flag in RAY_PORTS:
            node["ports"][flag] = free_port(taken)
            taken.add(node["ports"][flag])
        cmd = [
            sys.executable,
            "-m",
            "infra.raynode",
            "start",
            "--block",
            f"--address={HOST}:{state.ports['ray_gcs']}",
            f"--node-ip-address={HOST}",
            f"--temp-dir={_ray_temp(node['temp_dir'])}",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            *(f"--{flag}={port}" for flag, port in node["ports"].items()),
        ]
        node["pgid"] = _spawn(cmd, log, _ray_env(state_dir))
        state.nodes[name] = node
        state.save(state_dir)
        try:
            _wait(f"Ray {name}", lambda: _node_healthy(node), 180, node["pgid"], log)
            return name
        except StackError:
            _stop_group(node["pgid"])
            if attempt == 2:
                del state.nodes[name]
                state.save(state_dir)
                shutil.rmtree(node["temp_dir"], ignore_errors=True)
                raise
    raise AssertionError("unreachable")


def _node_healthy(node: dict) -> bool:
    """A joined node is up when its raylet and its runtime-env agent (which jobs' workers need) hold their ports."""
    pgid, ports = node["pgid"], node["ports"]
    return _owns_port(pgid, ports["node-manager-port"]) and _owns_port(pgid, ports["runtime-env-agent-port"])


def node_health(state_dir: Path) -> dict[str, bool]:
    """Joined node name → healthy."""
    return {name: _node_healthy(node) for name, node in StackState.load(state_dir.resolve()).nodes.items()}


def leave(state_dir: Path, name: str | None = None) -> list[str]:
    """Stop the joined node ``name`` (default: all of them); returns the names stopped. The head stays up."""
    state_dir = state_dir.resolve()
    state = StackState.load(state_dir)
    if name is not None and name not in state.nodes:
        raise StackError(f"{name}: no such joined node (joined: {', '.join(state.nodes) or 'none'})")
    if not state.nodes:
        return []
    stopped = []
    for node_name in [name] if name else list(state.nodes):
        node = state.nodes.pop(node_name)
        if _group_alive(node["pgid"]):
            _stop_group(node["pgid"])
            stopped.append(node_name)
        shutil.rmtree(node["temp_dir"], ignore_errors=True)
    state.save(state_dir)
    return stopped


def listening_pids(state_dir: Path) -> set[int]:
    """Every live pid in the stack's process groups (for tests and ``status``)."""
    state = StackState.load(state_dir.resolve())
    pgids = [*state.pgids.values(), *(node["pgid"] for node in state.nodes.values())]
    return {pid for pgid in pgids for pid in _group_members(pgid)}
