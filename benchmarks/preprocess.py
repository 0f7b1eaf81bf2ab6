"""Preprocessing throughput: audio-seconds encoded per wall-second, for the VAE alone and for the whole job.

    python benchmarks/preprocess.py --out benchmarks/results [--vae preset:tiny] [--clips 16] [--seconds 20]

Measures, on a synthetic set of 44.1 kHz stereo wav clips in a temp dir:
- ``encoder_only``: the VAE encoder on pre-decoded tensors (same batching as the job, one thread per worker,
  so it is the ceiling for one worker);
- ``job``: ``longplay preprocess`` end to end (list, decode, encode, tar, write, index) on Ray with 1 and with 2
  workers, each worker 1 CPU; wall time includes starting the actors, as a user would see it.
The ratio ``job / encoder_only`` makes the pipeline's overhead visible. Ray: ``RAY_ADDRESS`` if set, else a
local instance with every core. Writes ``OUT/preprocess.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PreprocessConfig  # noqa: E402


def make_clips(root: Path, clips: int, seconds: float) -> float:
    """``clips`` stereo 44.1 kHz 16-bit wav files of noise + tone; returns their total seconds."""
    rng = np.random.default_rng(0)
    n = int(seconds * 44100)
    t = np.arange(n) / 44100
    for i in range(clips):
        audio = 0.3 * np.sin(2 * np.pi * (110 + 20 * i) * t)[:, None] + 0.05 * rng.standard_normal((n, 2))
        sf.write(root / f"clip_{i:04d}.wav", audio.astype(np.float32), 44100, subtype="PCM_16")
        (root / f"clip_{i:04d}.txt").write_text(f"benchmark clip {i}")
    return clips * n / 44100


def encoder_only(vae: str, root: Path, cfg: PreprocessConfig, repeats: int = 2) -> dict:
    import torch

    from pipeline import components
    from preprocess import audio, encode

    torch.set_num_threads(1)
    model = components.load_vae(vae)
    pieces = [s.audio for p in sorted(root.glob("*.wav")) for s in audio.segments(audio.decode(str(p)).audio, 95.0)]
    encode.encode(model, pieces[:1], cfg.batch_size, cfg.chunk_seconds)  # warm-up (kernel selection)
    seconds = sum(p.shape[-1] for p in pieces) / 44100
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encode.encode(model, pieces, cfg.batch_size, cfg.chunk_seconds)
        best = min(best, time.perf_counter() - start)
    return {
        "audio_seconds": round(seconds, 3),
        "wall_seconds": round(best, 3),
        "audio_seconds_per_second": round(seconds / best, 2),
    }


def job_run(vae: str, src: Path, workers: int, cfg: PreprocessConfig) -> dict:
    from preprocess import job

    cfg = cfg.model_copy(update={"num_encoders": workers, "cpus_per_encoder": 1.0})
    with tempfile.TemporaryDirectory(prefix="longplay-bench-out-") as out:
        summary = job.run(str(src), out, vae, cfg, progress=False)
    return {
        "workers": workers,
        "audio_seconds": summary["encoded_audio_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "audio_seconds_per_second": summary["audio_seconds_per_second"],
        "samples": summary["samples"],
        "shards": summary["shards"],
        "setup_seconds": summary["setup_seconds"],
        "first_shard_seconds": summary["first_shard_seconds"],
        "worker_stage_seconds": summary["worker_stage_seconds"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for preprocess.json")
    parser.add_argument("--vae", default="preset:tiny")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each clip")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from pipeline import cluster

    cluster.connect(num_cpus=os.cpu_count())
    cfg = PreprocessConfig(samples_per_shard=4, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="longplay-bench-src-") as tmp:
        src = Path(tmp)
        total = make_clips(src, args.clips, args.seconds)
        enc = encoder_only(args.vae, src, cfg)
        runs = [job_run(args.vae, src, workers, cfg) for workers in (1, 2)]
    result = {
        "benchmark": "preprocess",
        "vae": args.vae,
        "input": {"clips": args.clips, "seconds_each": args.seconds, "audio_seconds": round(total, 3)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "encoder_only": enc,
        "job": {f"workers_{r['workers']}": r for r in runs},
        "job_over_encoder": {
            f"workers_{r['workers']}": round(r["audio_seconds_per_second"] / enc["audio_seconds_per_second"], 3)
            for r in runs
        },
        "speedup_2_over_1_workers": round(runs[1]["audio_seconds_per_second"] / runs[0]["audio_seconds_per_second"], 3),
        "load_average": os.getloadavg(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocess.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
