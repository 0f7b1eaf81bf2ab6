"""`longplay submit` runs a longplay command as a Ray Job on the local stack; no secret travels with it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infra import submit

pytestmark = pytest.mark.stack
REPO = submit.project_root()


def test_entrypoint_and_runtime_env_carry_no_secret():
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "AK", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    renv = submit.runtime_env(env)
    assert renv["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    assert ".venv" in renv["excludes"] and renv["working_dir"] == str(REPO)
    assert submit.entrypoint(["--", "longplay", "train", "clap", "x=1 y"]) == "python -m infra.cli train clap 'x=1 y'"
    with pytest.raises(ValueError):
        submit.entrypoint(["rm", "-rf", "/"])


def test_submit_runs_a_command_and_jobs_reads_it_back(local_stack):
    cmd = [sys.executable, "-m", "infra.cli", "submit", "--", "longplay", "config", "validate", "train"]
    cmd += ["configs/tiny/clap.yaml", "run.max_steps=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"max_steps": 3' in out.stdout
    job_id = out.stderr.split("submitted job ", 1)[1].split()[0]
    status = subprocess.run(
        [sys.executable, "-m", "infra.cli", "jobs", "status", job_id], capture_output=True, text=True, timeout=60
    )
    assert status.stdout.strip() == "SUCCEEDED"
    from pipeline import cluster

    info = cluster.job_client().get_job_info(job_id)
    assert local_stack.env["AWS_SECRET_ACCESS_KEY"] not in repr(info)


def test_a_failing_command_fails_the_submit(local_stack):
    cmd = [sys.executable, "-m", "infra.cli", "submit", "--", "longplay", "config", "validate", "train"]
    cmd += ["configs/tiny/clap.yaml", "run.max_stepz=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 1
    assert "run.max_stepz: unknown key" in out.stdout
