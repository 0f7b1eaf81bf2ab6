"""Handlers for the commands that belong to the shared library (config, models, weights, shards, generate), and
:class:`UsageError`, which any handler raises for bad usage. The command tree that runs them is ``infra/cli.py``."""

from __future__ import annotations

import argparse
import json

from pipeline.config import PreprocessConfig, TrainConfig, load_config

SCHEMAS = {"train": TrainConfig, "preprocess": PreprocessConfig}


class UsageError(Exception):
    """Bad usage; the command prints the message as one line and exits 2 (like a :class:`ConfigError`)."""


def config_validate(args: argparse.Namespace) -> int:
    """Load a config with overrides and print the resolved result (ConfigError → exit 2 via the CLI)."""
    cfg = load_config(SCHEMAS[args.schema], args.config, args.overrides)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def models_summary(args: argparse.Namespace) -> int:
    from pipeline.models.presets import parameter_counts

    counts = parameter_counts(args.preset)
    if args.json:
        print(json.dumps({"preset": args.preset, "parameters": counts}, indent=2))
    else:
        for name, count in counts.items():
            print(f"{name:12s} {count / 1e6:10.1f}M")
    return 0


def weights_import(args: argparse.Namespace) -> int:
    """``longplay weights import SRC --to DST``: DST ending in .safetensors gets the single-file export of the
    weights (:func:`pipeline.weights.import_weights`); any other DST becomes a bundle that ``longplay generate`` runs
    (:func:`pipeline.weights.bundle.import_bundle`, with ``--preset`` and ``--t5``). Prints a JSON summary."""
    if args.dst.endswith(".safetensors"):
        if args.preset is not None or args.t5 is not None:
            raise UsageError("--preset and --t5 are for a bundle import (--to a folder, not a .safetensors file)")
        from pipeline.weights import import_weights

        summary = import_weights(args.src, args.dst)
    else:
        from pipeline.weights.bundle import import_bundle

        summary = import_bundle(args.src, args.dst, preset=args.preset or "sa-open", t5=args.t5)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def shards_inspect(args: argparse.Namespace) -> int:
    from pipeline import shards

    print(json.dumps(shards.inspect(args.out), indent=2))
    return 0


def shards_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every tar, checksum and sample is sound, 1 otherwise (problems listed on stderr)."""
    import sys

    from pipeline import shards

    report = shards.verify(args.out)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(json.dumps({"ok": report.ok, "shards": report.shards, "samples": report.samples}))
    return 0 if report.ok else 1


def generate(args: argparse.Namespace) -> int:
    """``longplay generate``: one wav per prompt, exactly ``--seconds`` long, 44.1 kHz stereo."""
    import sys
    from pathlib import Path

    from pipeline.components import load_bundle
    from pipeline.generate import write_wav

    if (args.prompt is None) == (args.prompts is None):
        raise UsageError("give either a prompt or --prompts FILE")
    prompts = [args.prompt] if args.prompts is None else [p for p in Path(args.prompts).read_text().splitlines() if p]
    if args.seconds <= 0:
        raise UsageError("--seconds: must be positive")
    if not _model_exists(args.model):
        raise UsageError(f"model: {args.model} not found")
    bundle = load_bundle(args.model, args.device)
    outputs = []
    for i, prompt in enumerate(prompts):
        (audio,) = bundle.generate(
            [prompt], args.seconds, args.seconds_start, args.steps, args.cfg, args.seed, args.sampler
        )
        path = args.output if args.prompts is None else str(Path(args.output) / f"{i:03d}.wav")
        write_wav(path, audio, bundle.sample_rate)
        outputs.append({"prompt": prompt, "seconds": args.seconds, "path": path})
        print(f"wrote {path} ({args.seconds:g} s)", file=sys.stderr)
    print(json.dumps(outputs, indent=2))
    return 0


def _model_exists(uri: str) -> bool:
    """Whether a local path or an s3:// prefix holds anything; models:/ and runs:/ URIs are left to MLflow."""
    from pathlib import Path

    from pipeline import storage

    if uri.startswith(("models:/", "runs:/")):
        return True
    if storage.is_s3(uri):
        return next(iter(storage.list_uris(uri)), None) is not None
    return Path(uri).exists()
