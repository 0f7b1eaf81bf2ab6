"""Peak memory of writing one audio shard (``preprocess --vae none``): the samples' FLAC bytes plus the tar.

    python benchmarks/shard_memory.py --out benchmarks/results [--samples 256] [--seconds 95] [--distinct 8]

Builds ``samples`` distinct FLAC payloads of ``seconds`` each (``distinct`` clips encoded, each payload its own
bytes object, as the worker holds them), then calls ``shards.write_shard`` into a temp dir. Reports the shard's size,
the RSS with the payloads held (before the write) and the peak RSS during the write (VmHWM, reset before it), so
``(peak - held) / shard`` is how many extra copies of the shard the write made. The signal is a tone with very quiet
noise (``--noise 1e-6``: ~6 MB of FLAC per 95 s, a 1.5 GB shard); real music takes ~15 MB (``--noise 1e-3``) and the
extra memory, if any, scales with the shard. Measured (issue 15 item 5, 256 x 95 s, 1535 MB shard): tar built in memory
1699 -> 3234 MB peak (one extra copy), tar streamed to a temp file 1699 -> 1699 MB, same sha256.
Writes ``OUT/shard_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import shards  # noqa: E402
from preprocess import audio  # noqa: E402


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or since the last reset_peak) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS, so the peak is the write's and not the payloads' encoding."""
    Path("/proc/self/clear_refs").write_text("5")


def payloads(samples: int, seconds: float, distinct: int, noise: float) -> list[bytes]:
    rng = np.random.default_rng(0)
    n = int(seconds * audio.SAMPLE_RATE)
    t = np.arange(n) / audio.SAMPLE_RATE
    clips = []
    for i in range(distinct):
        tone = 0.3 * np.sin(2 * np.pi * (110 + 20 * i) * t)
        clips.append(audio.flac_bytes((tone + noise * rng.standard_normal((2, n))).astype(np.float32)))
    return [bytes(bytearray(clips[i % distinct])) for i in range(samples)]  # a copy each: no shared objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=95.0)
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--noise", type=float, default=1e-6, help="noise amplitude: sets how well FLAC packs it")
    args = parser.parse_args()
    flacs = payloads(args.samples, args.seconds, args.distinct, args.noise)
    meta = {"caption": "", "segment_seconds": args.seconds, "source_uri": "/x.wav"}
    samples = [shards.Sample(key=f"s{i:04d}", meta=meta, flac=f) for i, f in enumerate(flacs)]
    held = _status_mb("VmRSS")
    reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        stats = shards.write_shard(tmp, "train-000000", samples)
        wall = time.monotonic() - started
    peak = _status_mb("VmHWM")
    shard_mb = stats.bytes / 2**20
    result = {
        "samples": args.samples,
        "seconds": args.seconds,
        "shard_mb": round(shard_mb, 1),
        "rss_with_payloads_mb": round(held, 1),
        "peak_rss_mb": round(peak, 1),
        "extra_copies_of_the_shard": round((peak - held) / shard_mb, 2),
        "write_seconds": round(wall, 2),
        "sha256": stats.sha256,
        "python": platform.python_version(),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "shard_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
