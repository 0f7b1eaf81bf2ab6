"""``longplay submit -- <longplay command>``: run a longplay command as a Ray Job on ``RAY_ADDRESS``.

The project directory travels as the job's working dir (without .venv, .git, .longplay), so the cluster runs the
code you have. Endpoints travel as runtime-env variables; credentials never do: the cluster's nodes get them
from their own environment (instance profile, Kubernetes secret, or the local stack's Ray head), so no secret
appears on a command line, in the job's metadata or in its logs.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from pipeline import cluster

# Non-secret standard variables forwarded to the job when set here.
FORWARDED = ("AWS_ENDPOINT_URL", "AWS_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
EXCLUDES = [".venv", ".git", ".longplay", "**/__pycache__", "benchmarks/results", "*.egg-info", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def entrypoint(argv: list[str]) -> str:
    """``["longplay", "train", ...]`` → ``python -m infra.cli train ...`` run from the uploaded working dir."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] != "longplay":
        raise ValueError("submit runs longplay commands: longplay submit -- longplay <command> ...")
    return shlex.join(["python", "-m", "infra.cli", *argv[1:]])


def runtime_env(env: dict[str, str]) -> dict:
    return {
        "working_dir": str(project_root()),
        "excludes": EXCLUDES,
        "env_vars": {k: env[k] for k in FORWARDED if env.get(k)},
    }


def submit(argv: list[str], env: dict[str, str], wait: bool = True, timeout_s: float | None = None) -> tuple[str, str]:
    """Submit; with ``wait``, stream the job's logs until it ends. Returns (job id, final or current status)."""
    client = cluster.job_client()
    job_id = cluster.submit_job(client, entrypoint=entrypoint(argv), runtime_env=runtime_env(env))
    print(f"submitted job {job_id}", file=sys.stderr)
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    return job_id, follow(client, job_id, timeout_s)


def follow(client, job_id: str, timeout_s: float | None = None) -> str:
    """Print new log lines until the job is terminal (or ``timeout_s`` passes); return its status."""
    printed, deadline = 0, None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(2)
