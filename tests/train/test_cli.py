"""`longplay train` config handling (no launch)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from train.cli import resolve


def test_resolve_tiny_configs() -> None:
    cfg = resolve("clap", "configs/tiny/clap.yaml", ["run.max_steps=5", "data.shards=s3://b/x"])
    assert cfg.kind == "clap" and cfg.run.max_steps == 5 and cfg.data.shards == "s3://b/x"
    assert resolve("diffusion", "configs/tiny/diffusion.yaml", []).model.clap == "models:/tiny-clap@latest"


def test_resolve_rejects_mismatches() -> None:
    with pytest.raises(ConfigError, match="kind"):
        resolve("diffusion", "configs/tiny/clap.yaml", [])
    with pytest.raises(ConfigError, match="model.clap"):
        resolve("diffusion", "configs/tiny/diffusion.yaml", ["model.clap=null"])
    with pytest.raises(ConfigError, match="fp16"):
        resolve("clap", "configs/tiny/clap.yaml", ["deepspeed.precision=fp16"])
    with pytest.raises(ConfigError, match="run.bogus"):
        resolve("clap", "configs/tiny/clap.yaml", ["run.bogus=1"])
