"""`longplay train vae|clap|diffusion --config F [key=value ...]`: load and check the config, then launch Ray Train.

Exit codes: 0 trained, 1 the run failed (Ray Train's error is printed), 2 bad config (raised as ConfigError, which
the CLI turns into one line naming the key).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError, TrainConfig, load_config

log = logging.getLogger(__name__)


def resolve(kind: str, config: str | None, overrides: list[str]) -> TrainConfig:
    """The resolved TrainConfig for ``longplay train KIND``; a config file written for another kind is an error.
    Rules across sections (diffusion needs a CLAP, fp16 needs a GPU) are the schema's own (pipeline/config.py)."""
    raw_kind = _file_kind(config)  # first: a clap file read as diffusion would fail on a missing model.clap
    if raw_kind is not None and raw_kind != kind:
        raise ConfigError(f"kind: {config} is a {raw_kind!r} config, the command asked for {kind!r}")
    cfg = load_config(TrainConfig, config, [f"kind={kind}", *overrides])
    if cfg.kind != kind:
        raise ConfigError(f"kind: overridden to {cfg.kind!r}, the command asked for {kind!r}")
    _check_sources(cfg)
    return cfg


def _check_sources(cfg: TrainConfig) -> None:
    """A local or s3:// folder the run starts from must be there: a missing one is a bad config (exit 2), not a failed
    run after the workers have started. MLflow URIs are left to the run (looking them up needs the server)."""
    from pipeline import storage

    wanted = {"model.init_from": (cfg.model.init_from, ("config.json",))}
    if cfg.model.text_encoder == "t5":  # a T5 folder, or Stable Audio Open's layout with the encoder in text_encoder/
        wanted["model.t5"] = (cfg.model.t5, ("config.json", "text_encoder/config.json"))
    for key, (uri, markers) in wanted.items():
        if not uri or uri.startswith(("models:/", "runs:/")):
            continue
        if not any(storage.exists(storage.join(uri, *marker.split("/"))) for marker in markers):
            raise ConfigError(f"{key}: nothing at {uri} (expected {' or '.join(markers)} there)")


def _file_kind(config: str | None) -> str | None:
    if config is None:
        return None
    import yaml

    try:
        with open(config) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None  # load_config says what is wrong with the file, naming it
    return raw.get("kind") if isinstance(raw, dict) else None


def train(args: argparse.Namespace) -> int:
    cfg = resolve(args.kind, args.config, list(args.overrides))
    from train.launch import launch

    result = launch(cfg)
    if result.error is not None:
        print(f"longplay: training failed: {result.error}", file=sys.stderr)
        return 1
    print(
        json.dumps({"run": cfg.run.name, "checkpoint": str(result.checkpoint), "metrics": result.metrics}, default=str)
    )
    return 0
