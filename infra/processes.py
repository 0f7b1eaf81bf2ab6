"""Processes and ports of the local stack: free loopback ports, process groups read from /proc, start, wait, stop.

Every service (and every joined Ray node) runs in its own session, so its whole process tree is one process group:
``spawn`` returns that group's id, ``owns_port`` tells whether the group holds a listening socket (so nothing else
answering on a port we picked passes for our service), ``stop_group`` stops the group and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"  # every service and node of the stack listens on loopback only


class StackError(RuntimeError):
    pass


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


def pick_port(preferred: int, taken: set[int]) -> int:
    port = preferred if preferred not in taken and _port_free(preferred) else free_port(taken)
    taken.add(port)
    return port


def group_members(pgid: int) -> list[int]:
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


def group_alive(pgid: int) -> bool:
    try:  # reap the group leader if it is our own exited child, so it does not linger as a zombie
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    return bool(group_members(pgid))


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


def owns_port(pgid: int, port: int) -> bool:
    """Whether a live process of group ``pgid`` holds the listening socket on ``port``.

    Health checks use it so that another stack (or anything else) answering on a port we picked never passes
    for our service.
    """
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return False
    for pid in group_members(pgid):
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


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
            return 200 <= resp.status < 300
    except Exception:
        return False


def bin_path(name: str) -> str:
    """A console script installed beside this interpreter (the venv), else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name}: not installed (run `make install`)")
    return found


def wait_healthy(what: str, check, timeout: float, pgid: int, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not group_alive(pgid) or not leader_alive(pgid):  # the process we started has exited: no wait helps
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
    raise StackError(f"{what} did not become healthy; last log lines:\n" + "\n".join(tail))


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return proc.pid  # == its process group id (new session)


def leader_alive(pgid: int) -> bool:
    """The group's leader (the process we spawned) still runs: not exited, not a zombie."""
    try:
        state = (Path("/proc") / str(pgid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def stop_group(pgid: int | None, timeout: float = 8.0) -> None:
    """SIGTERM the group leader (it shuts its own children down in order), then SIGKILL whatever remains."""
    if pgid is None or not group_alive(pgid):
        return
    try:
        os.kill(pgid, signal.SIGTERM)
    except ProcessLookupError:  # the leader is gone but members remain: signal them all
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.2)
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
        while group_alive(pgid):
            time.sleep(0.1)
