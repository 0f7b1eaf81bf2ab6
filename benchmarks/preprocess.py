"""Preprocessing throughput: audio-seconds encoded per wall-second, for the VAE alone and for the whole job.

    python benchmarks/preprocess.py --out benchmarks/results [--vae preset:tiny|arch|URI] [--clips 16] [--seconds 20]
    python benchmarks/preprocess.py --out benchmarks/results --vae arch --inputs shared   # the shared comparison
    python benchmarks/preprocess.py --out DIR --vae arch --clips 64 --seconds 20   # steady state: 8 shards per worker

Measures, on a synthetic set of 44.1 kHz stereo wav clips in a temp dir:
- ``encoder_only``: the VAE encoder on pre-decoded tensors (same batching as the job, one thread per worker,
  so it is the ceiling for one worker), in a fresh process as a worker is;
- ``encoders_together``: two such processes encoding at once (no Ray, no I/O): how far this machine lets the
  encoder scale to two workers at all, the ceiling for the job's 2-over-1 speedup;
- ``job``: ``longplay preprocess`` end to end (list, decode, encode, tar, write, index) on Ray with 1 and with 2
  workers, each worker 1 CPU; wall time includes starting the actors, as a user would see it.
The ratio ``job / encoder_only`` makes the pipeline's overhead visible; each job run also carries the job's own
profile (``setup_seconds``, ``first_shard_seconds``, ``worker_stage_seconds``, ``workers_ready_seconds``,
``tail_seconds``, ``steady_audio_seconds_per_second``); ``--rounds N`` runs the jobs N times, interleaved, and
reports the median round with every round's figure. ``--vae arch`` is the tiny Oobleck
VAE of ``../shared/bench/ARCH.md`` (2048x, 16-ch latent, 2.48M parameters; random weights, seed 0) built from our
modules; ``--inputs shared`` is that benchmark's input set (20 stereo 44.1 kHz 16-bit files of 5-30 s: noise,
tones, chirps, amplitude-modulated noise). Ray: ``RAY_ADDRESS`` if set, else a
local instance with every core. Writes ``OUT/preprocess.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # _arch.py, when loaded by another script

from _arch import vae_config  # noqa: E402

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


def make_shared_inputs(root: Path) -> float:
    """The shared benchmark's folder: 20 files of 5-30 s (noise, tones, chirps, AM noise); returns their seconds."""
    rng = np.random.default_rng(0)
    total = 0.0
    for i in range(20):
        n = int(rng.uniform(5.0, 30.0) * 44100)
        t = np.arange(n) / 44100
        kind = i % 4
        if kind == 0:
            audio = 0.1 * rng.standard_normal((n, 2))
        elif kind == 1:
            audio = np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in rng.uniform(80, 2000, 2)], axis=1)
        elif kind == 2:
            f0, f1 = rng.uniform(50, 500), rng.uniform(2000, 12000)
            phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
            audio = np.stack([0.3 * np.sin(phase), 0.3 * np.sin(phase + 0.5)], axis=1)
        else:
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 8) * t)
            audio = 0.2 * envelope[:, None] * rng.standard_normal((n, 2))
        sf.write(root / f"in_{i:02d}.wav", audio.astype(np.float32), 44100, subtype="PCM_16")
        total += n / 44100
    return total


def arch_vae(directory: Path) -> str:
    """The ARCH.md benchmark VAE (random weights, seed 0) saved as a VAE export; returns its path."""
    import torch

    from pipeline import components
    from pipeline.models.autoencoder import Autoencoder

    torch.manual_seed(0)
    return str(components.save_vae(Autoencoder(vae_config()), directory))


def _encoder_and_pieces(vae: str, root: Path) -> tuple:
    import torch

    from pipeline import allocator, components
    from preprocess import audio

    torch.set_num_threads(1)
    allocator.tune()  # as the job's workers run (pipeline/allocator.py)
    model = components.load_vae(vae)
    pieces = [s.audio for p in sorted(root.glob("*.wav")) for s in audio.segments(audio.decode(str(p)).audio, 95.0)]
    return model, pieces


def encoder_only(vae: str, root: Path, cfg: PreprocessConfig, repeats: int = 2) -> dict:
    from preprocess import encode

    model, pieces = _encoder_and_pieces(vae, root)
    encode.encode(model, pieces[:1], cfg.batch_size, cfg.chunk_seconds)  # warm-up (kernel selection)
    seconds = sum(p.shape[-1] for p in pieces) / 44100
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode.encode(model, pieces, cfg.batch_size, cfg.chunk_seconds)
        passes.append(time.perf_counter() - start)
    # The first pass meets every piece length for the first time, as a job does (the heap grows, new shapes); later
    # passes reuse all of that, which no single job over new files can: the job is compared with both.
    return {
        "audio_seconds": round(seconds, 3),
        "wall_seconds": round(min(passes), 3),
        "audio_seconds_per_second": round(seconds / min(passes), 2),
        "first_pass_seconds": round(passes[0], 3),
        "first_pass_audio_seconds_per_second": round(seconds / passes[0], 2),
    }


def encoder_pass_together(vae: str, root: Path, cfg: PreprocessConfig, barrier) -> tuple[float, float]:
    """One of several encoder processes: a warm pass over every piece, then a timed pass started at the same
    moment as the others' (``barrier``). Returns (audio seconds, wall seconds) of the timed pass."""
    from preprocess import encode

    model, pieces = _encoder_and_pieces(vae, root)
    encode.encode(model, pieces, cfg.batch_size, cfg.chunk_seconds)  # as encoder_only's first pass
    barrier.wait()
    start = time.perf_counter()
    encode.encode(model, pieces, cfg.batch_size, cfg.chunk_seconds)
    return sum(p.shape[-1] for p in pieces) / 44100, time.perf_counter() - start


def encoders_together(vae: str, root: Path, cfg: PreprocessConfig, processes: int) -> dict:
    """The machine's own ceiling for ``processes`` workers: that many bare encoder processes (one thread each, no
    Ray, no I/O) encoding at once. Their combined audio-s/s over one process's says how far the cores, caches and
    memory bandwidth let the encoder scale, whatever the job around it does."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(processes) as pool:
        barrier = manager.Barrier(processes)
        parts = [pool.apply_async(encoder_pass_together, (vae, root, cfg, barrier)) for _ in range(processes)]
        passes = [part.get() for part in parts]
    seconds, wall = sum(p[0] for p in passes), max(p[1] for p in passes)
    return {"processes": processes, "audio_seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
            "audio_seconds_per_second": round(seconds / wall, 2)}  # fmt: skip


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
        "workers_ready_seconds": summary["workers_ready_seconds"],
        "tail_seconds": summary["tail_seconds"],
        "steady_audio_seconds_per_second": summary["steady_audio_seconds_per_second"],
    }


def median_run(runs: list[dict]) -> dict:
    """The round with the median audio-s/s (the lower one of an even count), carrying every round's figure."""
    ranked = sorted(runs, key=lambda r: r["audio_seconds_per_second"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["rounds_audio_seconds_per_second"] = [r["audio_seconds_per_second"] for r in runs]
    chosen["rounds_steady_audio_seconds_per_second"] = [r["steady_audio_seconds_per_second"] for r in runs]
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for preprocess.json")
    parser.add_argument("--vae", default="preset:tiny", help="a VAE URI, or 'arch' (../shared/bench/ARCH.md)")
    parser.add_argument("--inputs", choices=("clips", "shared"), default="clips", help="clips: noise + tone clips")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each clip")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="job runs per worker count, interleaved (1, 2, 1, 2...)")
    args = parser.parse_args()

    from pipeline import allocator, cluster

    allocator.tune()  # before the first tensor (the VAE built below) and before Ray starts: as `longplay` runs
    cluster.connect(num_cpus=os.cpu_count())
    cfg = PreprocessConfig(samples_per_shard=4, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="longplay-bench-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        vae = arch_vae(Path(tmp) / "vae") if args.vae == "arch" else args.vae
        if args.inputs == "shared":
            total = make_shared_inputs(src)
            inputs = {"set": "shared", "files": 20, "audio_seconds": round(total, 3)}
        else:
            total = make_clips(src, args.clips, args.seconds)
            inputs = {
                "set": "clips",
                "clips": args.clips,
                "seconds_each": args.seconds,
                "audio_seconds": round(total, 3),
            }
        # In a process of its own, like the job's workers: run here, the encoder's heap (GBs of huge pages at the
        # steady-state size) stayed with the driver and the jobs after it encoded 1.2x slower than in a fresh process.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            enc = pool.apply(encoder_only, (vae, src, cfg))
        together = encoders_together(vae, src, cfg, 2)
        rounds = [[job_run(vae, src, workers, cfg) for workers in (1, 2)] for _ in range(args.rounds)]
    runs = [median_run([r[i] for r in rounds]) for i in (0, 1)]
    steady = [r["steady_audio_seconds_per_second"] for r in runs]
    result = {
        "benchmark": "preprocess",
        "vae": args.vae,
        "input": inputs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "encoder_only": enc,
        "job": {f"workers_{r['workers']}": r for r in runs},
        "job_over_encoder": {
            f"workers_{r['workers']}": round(r["audio_seconds_per_second"] / enc["audio_seconds_per_second"], 3)
            for r in runs
        },
        "job_over_encoder_first_pass": {
            f"workers_{r['workers']}": round(
                r["audio_seconds_per_second"] / enc["first_pass_audio_seconds_per_second"], 3
            )
            for r in runs
        },
        "speedup_2_over_1_workers": round(runs[1]["audio_seconds_per_second"] / runs[0]["audio_seconds_per_second"], 3),
        "speedup_2_over_1_workers_per_round": [
            round(two["audio_seconds_per_second"] / one["audio_seconds_per_second"], 3) for one, two in rounds
        ],
        # The same while every worker is busy (no actor start-up, no tail): the ratio a longer job approaches.
        "speedup_2_over_1_workers_steady": round(steady[1] / steady[0], 3) if all(steady) else None,
        # The ceiling for the line above: two bare encoder processes at once over one (the same pass: the second).
        "encoders_together": together,
        "speedup_2_over_1_encoders": round(together["audio_seconds_per_second"] / enc["audio_seconds_per_second"], 3),
        "load_average": os.getloadavg(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preprocess.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
