"""``longplay preprocess SRC OUT --vae V [--manifest F] [--config F] [--allow-outside-src] [key=value ...]``.

See SPEC §5, §6. ``--allow-outside-src`` lets manifest rows name files outside SRC (else ``outside-src:`` errors).

Prints the end summary as one JSON object on stdout. Exit 0 when every shard is written (bad inputs are listed in
OUT/errors.jsonl, they do not fail the job), 1 when the job failed (a rerun resumes it), 2 for bad usage or config
(raised as ConfigError, which the CLI prints as one line).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline import storage
from pipeline.config import PreprocessConfig, load_config

log = logging.getLogger(__name__)


def preprocess(args: argparse.Namespace) -> int:
    from preprocess import job

    cfg = load_config(PreprocessConfig, args.config, args.overrides)
    try:
        summary = job.run(
            args.src, args.out, args.vae, cfg, manifest=args.manifest, allow_outside_src=args.allow_outside_src
        )
    except (job.JobFailed, storage.StorageError) as exc:
        print(f"longplay: preprocess failed: {exc}", file=sys.stderr)
        return 1
    log.info(
        "preprocess done: %d inputs → %d samples in %d shards (%d written, %d skipped), %d errors, "
        "%.3f audio hours; %.1f audio-s/s over %.1f s",
        summary["inputs"],
        summary["samples"],
        summary["shards"],
        summary["shards_written"],
        summary["shards_skipped"],
        summary["errors"],
        summary["audio_hours"],
        summary["audio_seconds_per_second"],
        summary["wall_seconds"],
    )
    print(json.dumps(summary))
    return 0
