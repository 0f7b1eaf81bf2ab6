"""Training throughput on CPU: optimizer steps/s, samples/s and the fraction of step time spent waiting for data.

    python benchmarks/train.py --out benchmarks/results [--steps 20] [--threads 2]

One DeepSpeed rank (gloo, world size 1) runs the diffusion objective (v-loss with CFG dropout) through the same
``train.data`` stream and ``train.engine.Engine`` the Ray Train workers use, on synthetic latent shards in a temp dir:
- ``tiny``: the tiny preset (64-ch latents, 2-block DiT 128 wide), 8 s windows, micro-batch 8;
- ``mid``: a mid-size DiT (64-ch latents, width 384, 6 blocks, ~20M parameters: between tiny and sa-open), 8 s
  windows at the sa1 VAE's latent rate, micro-batch 4.
Text tokens are random (CLAP's cost is not part of the step). Writes ``OUT/train.json``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LATENT_RATE = 44100 / 1024


def write_shards(out: str, channels: int, count: int = 64) -> list[str]:
    from pipeline import shards

    rng = np.random.default_rng(0)
    samples = [
        shards.Sample(
            key=f"s{i:05d}",
            meta={"caption": "x", "seconds_total": 20.0, "offset_seconds": 0.0, "latent_rate": LATENT_RATE},
            latents=rng.normal(size=(channels, int(12 * LATENT_RATE))).astype(np.float16),
        )
        for i in range(count)
    ]
    stats = [shards.write_shard(out, shards.shard_name("train", n), samples[n::4]) for n in range(4)]
    shards.write_index(
        out, vae_id="x", vae_config_hash="x", latent_channels=channels, latent_rate=LATENT_RATE, shards=stats, errors=[]
    )
    return shards.shard_uris(out, "train")


def model_for(name: str):
    import dataclasses

    from pipeline.models.conditioning import DIFFUSION_PRESETS, ConditionedDiffusionModel

    base = DIFFUSION_PRESETS["tiny"]
    if name == "tiny":
        return ConditionedDiffusionModel(base)
    dit = dataclasses.replace(  # the tiny preset's DiT (its timing-frame input included), wider and deeper
        base.dit,
        io_channels=64,
        embed_dim=384,
        depth=6,
        num_heads=6,
        cond_token_dim=256,
        cross_attn_dim=256,
        cross_attn_kv_heads=2,
        global_cond_dim=512,
    )
    return ConditionedDiffusionModel(dataclasses.replace(base, dit=dit, io_channels=64, cond_token_dim=256))


def bench(name: str, micro_batch: int, steps: int, workers: int) -> dict:
    import torch

    from pipeline.config import TrainConfig
    from pipeline.diffusion import sample_t, v_loss
    from train import data
    from train.engine import Engine

    model = model_for(name)
    cfg = TrainConfig.model_validate(
        {
            "kind": "diffusion",
            "data": {"shards": "bench", "window_seconds": 8.0, "shuffle_buffer": 16, "num_loader_workers": workers},
            "run": {"max_steps": steps + 2},
            "model": {"clap": "unused"},  # a diffusion config names its CLAP; the text tokens here are random
            "deepspeed": {"micro_batch": micro_batch, "warmup_steps": 1},
        }
    )
    channels = model.cfg.io_channels
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(tmp, channels)
        window = round(cfg.data.window_seconds * LATENT_RATE)
        batches = data.batches_from(cfg, urls, window, LATENT_RATE, 0.0, 0, 1)(0)
        engine = Engine(model, cfg, 0, 1)
        tokens = torch.randn(micro_batch, 16, model.cfg.cond_token_dim)
        tmask = torch.ones(micro_batch, 16, dtype=torch.bool)

        def step() -> float:
            t0 = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - t0
            x0 = batch["x"]
            t = sample_t(x0.shape[0])

            def fn(x_t, t_):
                return engine(x_t, t_, tokens, tmask, batch["seconds_start"], batch["seconds_total"], cfg_dropout=0.1)

            loss = v_loss(fn, x0, t, torch.randn_like(x0), mask=batch["mask"])
            engine.backward(loss)
            engine.step()
            return wait

        for _ in range(2):  # warm-up: first allocations, loader start
            step()
        start, waited = time.perf_counter(), 0.0
        for _ in range(steps):
            waited += step()
        elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {
        "preset": name,
        "parameters": params,
        "micro_batch": micro_batch,
        "window_frames": window,
        "loader_workers": workers,
        "steps": steps,
        "steps_per_s": round(steps / elapsed, 3),
        "samples_per_s": round(steps * micro_batch / elapsed, 2),
        "data_wait_fraction": round(waited / elapsed, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for train.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", "29561")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    results = [bench("tiny", 8, args.steps, 0), bench("tiny", 8, args.steps, 1), bench("mid", 4, args.steps, 0)]
    dist.destroy_process_group()
    report = {
        "benchmark": "train",
        "device": "cpu",
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
