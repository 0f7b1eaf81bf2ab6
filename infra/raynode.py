"""Ray nodes joined to the stack's head on this machine (``longplay stack join`` / ``leave``), and their launcher.

``join`` starts one more Ray node: its own raylet, object store, agents, free ports and private temp dir, all on
127.0.0.1, with the head's environment and Ray's own token; ``leave`` stops it (``stack down`` stops them all first).

The launcher, ``python -m infra.raynode start --address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...``, is Ray's
own ``ray start`` for a node that joins a loopback head on the same machine. Plain ``ray start`` cannot do that while
keeping every port on 127.0.0.1:
- it treats 127.0.0.1 in ``--address`` and ``--node-ip-address`` as "this machine" and swaps in the routable IP
  (``services.resolve_ip_for_localhost``), and Ray's processes bind all interfaces for any node IP other than
  127.0.0.1 (measured: GCS and raylet then listen on ``*``);
- single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), which keeps 127.0.0.1 for the head, refuses to
  start a non-head node.

So this runs the same CLI with both addresses kept as given. The environment still carries single-machine mode, so
every process the node starts (raylet, agents, workers) resolves 127.0.0.1 as the head's processes do; only this
launcher is allowed to join. Nothing else of ``ray start`` changes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from infra.processes import HOST, StackError, free_port, group_alive, owns_port, spawn, stop_group, wait_healthy
from infra.stackstate import RAY_PORTS, StackState, healthy, private_dir, ray_env, ray_temp


def join(state_dir: Path, num_cpus: int = 1) -> str:
    """Start one more Ray node on this machine, joined to the stack's head; return its name (``node1``, ...).

    The node gets its own raylet, object store, agents, free ports and temp dir, all on 127.0.0.1, and the head's
    environment (endpoints, credentials, single-machine mode); the token is Ray's own ``~/.ray/auth_token``. On a
    real cluster the same is ``ray start --address=HEAD:6379`` on another machine.
    """
    state_dir = state_dir.resolve()
    state = StackState.load(state_dir)
    if not state.ports or not healthy(state, "ray"):
        raise StackError(f"no healthy Ray head under {state_dir}; run `longplay stack up` first")
    number = 1 + max((int(n.removeprefix("node")) for n in state.nodes), default=0)
    name = f"node{number}"
    node = {"pgid": 0, "temp_dir": private_dir(), "ports": {}}
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
            f"--temp-dir={ray_temp(node['temp_dir'])}",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            *(f"--{flag}={port}" for flag, port in node["ports"].items()),
        ]
        node["pgid"] = spawn(cmd, log, ray_env(state_dir))
        state.nodes[name] = node
        state.save(state_dir)
        try:
            wait_healthy(f"Ray {name}", lambda: _node_healthy(node), 180, node["pgid"], log)
            return name
        except StackError:
            stop_group(node["pgid"])
            if attempt == 2:
                del state.nodes[name]
                state.save(state_dir)
                shutil.rmtree(node["temp_dir"], ignore_errors=True)
                raise
    raise AssertionError("unreachable")


def _node_healthy(node: dict) -> bool:
    """A joined node is up when its raylet and its runtime-env agent (which jobs' workers need) hold their ports."""
    pgid, ports = node["pgid"], node["ports"]
    return owns_port(pgid, ports["node-manager-port"]) and owns_port(pgid, ports["runtime-env-agent-port"])


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
        if group_alive(node["pgid"]):
            stop_group(node["pgid"])
            stopped.append(node_name)
        shutil.rmtree(node["temp_dir"], ignore_errors=True)
    state.save(state_dir)
    return stopped


def main() -> int:
    from ray._private import ray_constants, services
    from ray.scripts import scripts

    ray_constants.ENABLE_RAY_CLUSTER = True  # let this process start a non-head node
    services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 for the node and the head's address
    return scripts.main()


if __name__ == "__main__":
    sys.exit(main())
