"""Shared fixtures: one real local stack (SeaweedFS S3, MLflow, Ray head) for the whole session.

The stack lives in a temporary state dir with ports picked at start, so a developer's own `.longplay` stack is
never touched, and it is torn down (process groups killed, Ray temp dir removed) when the session ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import stack as stack_mod

STANDARD_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "RAY_ADDRESS",
)


class LocalStack:
    def __init__(self, state_dir: Path, env: dict[str, str]):
        self.state_dir = state_dir
        self.env = env

    @property
    def state(self) -> stack_mod.StackState:
        return stack_mod.StackState.load(self.state_dir)

    def s3_prefix(self, name: str = "") -> str:
        """A fresh s3:// prefix in the stack's bucket for one test."""
        return f"s3://{stack_mod.BUCKET}/tests/{name or 'x'}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory) -> Iterator[LocalStack]:
    state_dir = tmp_path_factory.mktemp("stack")
    saved = {k: os.environ.get(k) for k in (*STANDARD_VARS, *stack_mod.NO_TELEMETRY)}
    try:
        os.environ.update(stack_mod.NO_TELEMETRY)  # the MLflow client in this process stays quiet too
        env = stack_mod.up(state_dir, num_cpus=2, preferred_ports=False)
        os.environ.update(env)
        yield LocalStack(state_dir, env)
    finally:
        stack_mod.down(state_dir)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def ray_on_stack(local_stack) -> Iterator[None]:
    """The driver connected to the stack's Ray head (2 CPUs), shared by every test that needs Ray."""
    from pipeline import cluster

    cluster.connect()  # sets Ray's client variables before Ray is imported
    import ray

    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_music(tmp_path_factory) -> Path:
    """About a minute of real music (the demo dataset's renderer: music21 corpus + fluidsynth), 3-10 s excerpts:
    OUT/manifest.jsonl + OUT/audio/*.wav. Skips where the renderer's tools are missing."""
    from preprocess.demo_dataset import build_demo_dataset, require_tools

    missing = require_tools()
    if missing:
        pytest.skip(f"fluidsynth/soundfont/music21 missing: run `{missing}`")
    out = tmp_path_factory.mktemp("demo-music")
    build_demo_dataset(out, minutes=1.0, min_seconds=3.0, max_seconds=10.0)
    return out
