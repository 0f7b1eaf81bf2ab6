"""Generation and a training step on the shared benchmark's networks (../shared/bench/ARCH.md), random weights.

    python benchmarks/generate.py --out benchmarks/results [--repeats 3] [--threads 2]

The networks are built from our own modules with the configs in ../shared/bench/README.md: the tiny Oobleck VAE
(2048x, 16-ch latent, 2,480,882 parameters) and the tiny conditioned DiT (5,169,280 parameters, 5,235,584 with our
timing conditioners; 216 latent frames = 10.03 s). Measured, each as the median of ``--repeats`` after one warm-up,
at ``--threads`` torch threads:
- ``generate``: 10.03 s with dpmpp-3m-sde, 50 steps, CFG 6, sigma 0.01-100 (the README's work): in fp32 with the two
  CFG branches as one batched forward and as two calls, then with the VAE decode; under bf16 autocast where the CPU
  has native bf16 (what ``longplay generate`` runs there), with the latents' distance to the fp32 ones; the decode
  alone (fp32);
- ``train_step``: batch 4 of [16, 216] latents with 3 context tokens, v-objective, CFG dropout 0.1, AdamW: a bare
  torch step, and the same step through ``train.engine.Engine`` (DeepSpeed, world size 1, ZeRO 0) in fp32 and bf16.
Writes ``OUT/generate.json``. Compare figures only within one run of one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # _arch.py, when loaded by another script

from _arch import arch_models  # noqa: E402

FRAMES = 216  # 10.03 s at 44100 / 2048
TOKENS = 3  # context tokens: one text token + seconds_start + seconds_total


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first allocations
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 4), "all_s": [round(t, 4) for t in times]}


def bench_generate(vae, model, repeats: int) -> dict:
    """Seconds to generate 10.03 s as ``longplay generate`` does (``inference_autocast``: bf16 on a CPU with native
    bf16, see ``pipeline.generate.cpu_bf16``), and the same in fp32; the decode is fp32 either way."""
    import torch

    from pipeline.diffusion import sample
    from pipeline.generate import cpu_bf16
    from pipeline.models.conditioning import guided_model_fn

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, TOKENS - 2, 128, generator=gen)
    mask = torch.ones(1, TOKENS - 2, dtype=torch.bool)
    start, total = torch.zeros(1), torch.tensor([10.0])

    def latents(batched: bool = True, bf16: bool = False) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fn = guided_model_fn(model, tokens, mask, start, total, cfg_scale=6.0, batched=batched)
            z = sample(fn, (1, 16, FRAMES), 50, "dpmpp-3m-sde", sigma_min=0.01, sigma_max=100.0, seed=0)
        return z.float()

    out: dict = {"audio_seconds": round(FRAMES * 2048 / 44100, 3), "cpu_bf16": cpu_bf16()}
    with torch.inference_mode():
        z = latents()
        out["fp32"] = {
            "latents_batched_cfg": summary(timed(lambda: latents(), repeats)),
            "latents_two_call_cfg": summary(timed(lambda: latents(batched=False), repeats)),
            "with_decode": summary(timed(lambda: vae.decode(latents()), repeats)),
        }
        out["decode_alone"] = summary(timed(lambda: vae.decode(z), repeats))
        if cpu_bf16():  # what longplay generate runs on this machine
            out["bf16_autocast"] = {
                "latents_batched_cfg": summary(timed(lambda: latents(bf16=True), repeats)),
                "with_decode": summary(timed(lambda: vae.decode(latents(bf16=True)), repeats)),
                "latents_relative_difference_to_fp32": round(float((latents(bf16=True) - z).norm() / z.norm()), 4),
            }
    return out


def bench_train_step(model_factory, repeats: int, steps: int = 5) -> dict:
    import torch

    from pipeline.config import TrainConfig
    from pipeline.diffusion import sample_t, v_loss
    from train.engine import Engine

    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 16, FRAMES, generator=gen)
    tokens, mask = torch.randn(4, TOKENS - 2, 128, generator=gen), torch.ones(4, TOKENS - 2, dtype=torch.bool)
    start, total = torch.zeros(4), torch.full((4,), 10.0)

    def loss_of(model, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        def fn(x_t, t):
            return model(x_t, t, tokens.to(dtype), mask, start, total, cfg_dropout=0.1)

        x = x0.to(dtype)  # as train/diffusion.py feeds a bf16 engine
        return v_loss(fn, x, sample_t(4).to(dtype), torch.randn_like(x))

    _, bare_model = model_factory()
    bare_model.train()
    optimizer = torch.optim.AdamW(bare_model.parameters(), lr=1e-4, eps=1e-6)

    def bare() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_of(bare_model).backward()
            optimizer.step()

    result = {"bare_step_s": round(statistics.median(timed(bare, repeats)) / steps, 4)}
    for precision in ("fp32", "bf16"):  # bf16: DeepSpeed keeps the module in bf16, fp32 master weights
        raw = {"kind": "diffusion", "data": {"shards": "bench"}, "model": {"clap": "x"}}
        cfg = TrainConfig.model_validate({**raw, "deepspeed": {"micro_batch": 4, "precision": precision}})
        _, engine_model = model_factory()
        engine = Engine(engine_model.train(), cfg, 0, 1)

        def through_engine(engine=engine) -> None:
            for _ in range(steps):
                engine.backward(loss_of(engine, engine.dtype))
                engine.step()

        result[f"engine_{precision}_step_s"] = round(statistics.median(timed(through_engine, repeats)) / steps, 4)
        engine.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for generate.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("generate", "train_step"), default=None)
    args = parser.parse_args()
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", "29563")
    import torch

    from pipeline import allocator

    tuned = allocator.tune()
    torch.set_num_threads(args.threads)
    vae, model = arch_models()
    result = {
        "machine": platform.machine(),
        "threads": args.threads,
        "allocator_tuned": tuned,
        "parameters": {
            "vae": sum(p.numel() for p in vae.parameters()),
            "dit": sum(p.numel() for p in model.parameters()),
        },
    }
    if args.only in (None, "generate"):
        result["generate"] = bench_generate(vae, model, args.repeats)
    if args.only in (None, "train_step"):
        result["train_step"] = bench_train_step(arch_models, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
