"""Handlers for ``longplay stack up|down|status|join|leave``, ``longplay submit`` and ``longplay jobs``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infra import stack


def stack_up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    print(f"starting the local stack under {state_dir}/ ...", file=sys.stderr)
    try:
        env = stack.up(state_dir, num_cpus=args.num_cpus)
    except stack.StackError as err:
        print(f"longplay: stack up failed: {err}", file=sys.stderr)
        return 1
    state = stack.StackState.load(state_dir.resolve())
    print(
        f"S3 http://127.0.0.1:{state.ports['s3']}  MLflow http://127.0.0.1:{state.ports['mlflow']}  "
        f"Ray dashboard http://127.0.0.1:{state.ports['ray_dashboard']}\n"
        f"# the block below is also in {state_dir}/credentials.env (mode 0600); to use it: "
        f"eval $(longplay stack up) or source {state_dir}/credentials.env",
        file=sys.stderr,
    )
    print(stack.export_block(env))
    return 0


def stack_down(args: argparse.Namespace) -> int:
    stopped = stack.down(Path(args.state_dir))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"), file=sys.stderr)
    return 0


def stack_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    state = stack.StackState.load(state_dir)
    if not state.ports:
        print(f"no stack under {state_dir}")
        return 1
    health = stack.health(state_dir)
    urls = {
        "s3": f"http://127.0.0.1:{state.ports['s3']}",
        "mlflow": f"http://127.0.0.1:{state.ports['mlflow']}",
        "ray": f"http://127.0.0.1:{state.ports['ray_dashboard']}",
    }
    for name, ok in health.items():
        print(f"{name:8s} {'healthy' if ok else 'DOWN':8s} {urls[name]}")
    nodes = stack.node_health(state_dir)
    for name, ok in nodes.items():
        print(f"{name:8s} {'healthy' if ok else 'DOWN':8s} Ray node joined to the head")
    return 0 if all(health.values()) and all(nodes.values()) else 1


def stack_join(args: argparse.Namespace) -> int:
    """Start another Ray node on this machine, joined to the stack's head (a local two-node cluster)."""
    try:
        name = stack.join(Path(args.state_dir), num_cpus=args.num_cpus)
    except stack.StackError as err:
        print(f"longplay: stack join failed: {err}", file=sys.stderr)
        return 1
    print(f"joined {name} ({args.num_cpus} CPUs) to the Ray head; `longplay stack leave {name}` stops it")
    return 0


def stack_leave(args: argparse.Namespace) -> int:
    """Stop a node ``stack join`` started (all of them without a name); the head and services stay up."""
    try:
        stopped = stack.leave(Path(args.state_dir), args.name)
    except stack.StackError as err:
        print(f"longplay: stack leave failed: {err}", file=sys.stderr)
        return 1
    print("stopped: " + (", ".join(stopped) if stopped else "no joined node was running"), file=sys.stderr)
    return 0


def submit(args: argparse.Namespace) -> int:
    import os

    from infra import submit as submit_mod

    try:
        job_id, status = submit_mod.submit(list(args.argv), dict(os.environ), wait=not args.no_wait)
    except ValueError as err:
        from pipeline.cli import UsageError

        raise UsageError(str(err)) from None
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") and (args.no_wait or status == "SUCCEEDED") else 1


def jobs(args: argparse.Namespace) -> int:
    from infra import submit as submit_mod
    from pipeline import cluster

    client = cluster.job_client()
    if args.action == "status":
        print(client.get_job_status(args.job_id))
    elif args.action == "logs":
        if args.follow:
            status = submit_mod.follow(client, args.job_id)
            return 0 if status == "SUCCEEDED" else 1
        sys.stdout.write(client.get_job_logs(args.job_id))
    else:
        print("stopped" if client.stop_job(args.job_id) else "not running")
    return 0
