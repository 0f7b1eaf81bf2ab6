"""glibc's allocator as ``pipeline.allocator`` tunes it vs its defaults, on the preprocessing encode.

    python benchmarks/allocator.py --out benchmarks/results [--runs 3]

Each run is a fresh process (the allocator is set once per process), alternating ``LONGPLAY_MALLOC=default`` and
the tuned setting, so the machine's drift falls on both alike. A run builds the ``../shared/bench`` VAE (random
weights, seed 0) and its 20-file input set, then times on one torch thread the encoder alone over every piece (as
``benchmarks/preprocess.py`` times it) and the whole job on the in-process backend. Writes ``OUT/allocator.json``
(every run, medians, tuned / default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run() -> dict:
    """In this process: the encoder alone and the job on the shared set (called as ``--one``)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from pipeline import allocator
    from pipeline.config import PreprocessConfig
    from preprocess import job

    tuned = allocator.tune()
    torch.set_num_threads(1)
    bench = _load_bench()  # benchmarks/preprocess.py: the shared VAE and inputs
    with tempfile.TemporaryDirectory(prefix="longplay-bench-alloc-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        vae = bench.arch_vae(Path(tmp) / "vae")
        seconds = bench.make_shared_inputs(src)
        cfg = PreprocessConfig(samples_per_shard=4, batch_size=4)
        encoder = bench.encoder_only(vae, src, cfg, repeats=1)["wall_seconds"]
        start = time.perf_counter()
        job.run(str(src), str(Path(tmp) / "out"), vae, cfg, backend="local", progress=False)
        whole = time.perf_counter() - start
    return {
        "tuned": tuned,
        "audio_seconds": round(seconds, 3),
        "encoder_s": round(encoder, 3),
        "job_s": round(whole, 3),
    }


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_preprocess", ROOT / "benchmarks" / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for allocator.json")
    parser.add_argument("--runs", type=int, default=3, help="runs per setting, alternating")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run()))
        return 0
    runs = {"default": [], "tuned": []}
    for _ in range(args.runs):
        for name, env in (("default", {"LONGPLAY_MALLOC": "default"}), ("tuned", {})):
            base = {k: v for k, v in os.environ.items() if k != "LONGPLAY_MALLOC"}
            out = subprocess.run(
                [sys.executable, __file__, "--one"], env={**base, **env}, capture_output=True, text=True, check=True
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = {
        name: {k: statistics.median(r[k] for r in rows) for k in ("encoder_s", "job_s")} for name, rows in runs.items()
    }
    result = {
        "benchmark": "allocator",
        "runs": runs,
        "median": median,
        "speedup_tuned_over_default": {
            k: round(median["default"][k] / median["tuned"][k], 3) for k in ("encoder_s", "job_s")
        },
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "allocator.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
