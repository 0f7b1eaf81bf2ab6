"""GPU benchmark (issue 13): the paper's headline and what training fits, on one device, with random weights.

    python benchmarks/gpu.py --out benchmarks/results                # on CUDA: the full models (meant to take < 8 min)
    python benchmarks/gpu.py --out DIR --device cpu --preset tiny    # the same code in seconds (a test; CPU default)

Writes ``OUT/gpu.json`` with three sections (speed does not depend on the weights, so they are random):
1. ``generation``: 95 s of 44.1 kHz stereo with sa1 (U-Net) and sa-open (DiT), 100 dpmpp-3m-sde steps at CFG 7, at
   batch 1 and 4, as ``longplay generate`` runs it (bf16 autocast on CUDA, CFG as one batched forward, the VAE decode
   in fp32): seconds to sample the latents, seconds to decode, peak memory without and with the decode.
2. ``training``: one bf16 step of the sa1 U-Net and the sa-open DiT (the v-objective of ``train/diffusion.py``) under
   DeepSpeed ZeRO-2 at world size 1 on 95 s windows, without and with activation checkpointing, at the largest
   micro-batch that fits (doubling until out of memory): samples/s and peak memory. Then a LoRA step on sa-open
   (issue 16) as configs/sa-open/diffusion-lora.yaml sets it (adapters, the rest frozen, Open's 47.55 s window).
3. ``vae``: encoding 95 s with the sa1 and sa-open VAEs in fp32 and under bf16 autocast: audio-seconds per second and
   the relative difference of the latents (‖z_bf16 − z_fp32‖ / ‖z_fp32‖); the same for the decode.
The tiny preset swaps in the tiny models (the U-Net and the DiT at test size), 2 s, 3 steps, batch 1 and 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLE_RATE = 44100
LORA_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sa-open" / "diffusion-lora.yaml"


@dataclass(frozen=True)
class Preset:
    seconds: float  # audio length generated, trained on (window) and encoded
    steps: int  # sampler steps
    cfg_scale: float
    models: dict[str, tuple[str, str]]  # label → (diffusion preset, autoencoder preset)
    batches: tuple[int, ...]  # generation batch sizes
    micro_batches: tuple[int, ...]  # training micro-batches tried, in order, until one does not fit
    timed_steps: int  # training steps timed at the largest micro-batch (after one warm-up step)
    precision: str  # DeepSpeed precision of the training step
    lora_seconds: float | None = None  # the LoRA step's window; None: LORA_CONFIG's (Open's 2,097,152 samples)


PRESETS = {
    "full": Preset(
        seconds=95.0,
        steps=100,
        cfg_scale=7.0,
        models={"sa1": ("sa1", "sa1"), "sa-open": ("sa-open", "sa-open")},
        batches=(1, 4),
        micro_batches=(1, 2, 4, 8, 16, 32),
        timed_steps=3,
        precision="bf16",
    ),
    "tiny": Preset(
        seconds=2.0,
        steps=3,
        cfg_scale=7.0,
        models={"sa1": ("tiny-unet", "tiny"), "sa-open": ("tiny", "tiny")},
        batches=(1, 2),
        micro_batches=(1, 2),
        timed_steps=1,
        precision="bf16",  # the path the GPU run takes (DeepSpeed's bf16 engine also runs on the CPU)
        lora_seconds=2.0,
    ),
}


# ----------------------------------------------------------------------------------------------- helpers
def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    """Peak allocated GPU memory since the last reset (GiB); None on the CPU (not measured there)."""
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def text_conditioning(model, batch: int, device):
    """Random text tokens (B, L, D) and an all-valid mask: CLAP's cost is not part of what is measured."""
    import torch

    cfg = model.cfg
    tokens = torch.randn(batch, cfg.max_text_tokens, cfg.cond_token_dim, device=device)
    return tokens, torch.ones(batch, cfg.max_text_tokens, dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------------------------- 1. generation
def generate_once(model, vae, batch: int, seconds: float, steps: int, cfg_scale: float, device) -> dict:
    """Sample ``batch`` latent windows of ``seconds`` as Bundle.generate does (bf16 autocast on CUDA, CFG as one
    batched forward), then decode them in fp32; seconds and peak memory of each part."""
    import torch

    from pipeline.diffusion import sample
    from pipeline.generate import inference_autocast
    from pipeline.models.conditioning import guided_model_fn

    tokens, mask = text_conditioning(model, batch, device)
    start = torch.zeros(batch, device=device)
    total = torch.full((batch,), float(math.ceil(seconds)), device=device)
    shape = (batch, vae.latent_channels, math.ceil(seconds * vae.latent_rate))
    with torch.no_grad():
        reset_peak(device)
        synchronize(device)
        started = time.perf_counter()
        with inference_autocast(device):
            fn = guided_model_fn(model, tokens, mask, start, total, cfg_scale)
            latents = sample(fn, shape, steps, "dpmpp-3m-sde", seed=0, device=device).float()
        synchronize(device)
        sampled = time.perf_counter()
        memory_sample = peak_gib(device)
        audio = vae.decode(latents).clamp(-1, 1)  # fp32
        synchronize(device)
        decoded = time.perf_counter()
    return {
        "latent_frames": shape[-1],
        "sample_s": round(sampled - started, 4),
        "decode_s": round(decoded - sampled, 4),
        "total_s": round(decoded - started, 4),
        "peak_gib_without_decode": memory_sample,
        "peak_gib_with_decode": peak_gib(device),
        "audio_finite": bool(torch.isfinite(audio).all()),
    }


def bench_generation(preset: Preset, device) -> list[dict]:
    import torch

    from pipeline.models.autoencoder import build_autoencoder
    from pipeline.models.conditioning import build_diffusion_model

    rows = []
    for label, (diffusion_preset, vae_preset) in preset.models.items():
        torch.manual_seed(0)
        with torch.device(device):
            model = build_diffusion_model(diffusion_preset).eval()
        vae = build_autoencoder(vae_preset, device).eval()
        for batch in preset.batches:
            generate_once(model, vae, batch, preset.seconds, 2, preset.cfg_scale, device)  # warm-up: kernels, memory
            result = generate_once(model, vae, batch, preset.seconds, preset.steps, preset.cfg_scale, device)
            rows.append(
                {"model": label, "diffusion_preset": diffusion_preset, "batch": batch, "seconds_audio": preset.seconds}
                | {"steps": preset.steps, "cfg_scale": preset.cfg_scale, "sampler": "dpmpp-3m-sde"}
                | result
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
        del model, vae
        free(device)
    return rows


# ----------------------------------------------------------------------------------------------- 2. training
def train_config(preset: Preset, micro_batch: int, checkpointing: bool):
    from pipeline.config import TrainConfig

    deepspeed = {"zero_stage": 2, "precision": preset.precision, "micro_batch": micro_batch, "warmup_steps": 1}
    return TrainConfig.model_validate(
        {
            "kind": "diffusion",
            "data": {"shards": "benchmark", "window_seconds": preset.seconds},
            "run": {"max_steps": 1000},
            "deepspeed": deepspeed,
            "ema": {"enabled": False},  # the EMA copy lives on rank 0 only and is not part of a step's cost
            "model": {"clap": "benchmark", "activation_checkpointing": checkpointing},
        }
    )


def lora_recipe() -> tuple[dict, float]:
    """The LoRA settings (``pipeline.lora.settings``) and window seconds of LORA_CONFIG: what the LoRA row times."""
    from pipeline import lora
    from pipeline.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, LORA_CONFIG)
    ls = cfg.model.lora
    return lora.settings(ls.rank, ls.alpha, ls.dropout, ls.target_modules), cfg.data.window_seconds


def new_engine(
    preset: Preset, diffusion_preset: str, micro_batch: int, checkpointing: bool, device, lora_settings=None
):
    """A ZeRO-2 DeepSpeed engine (world size 1) over a freshly initialised model built on ``device``; with
    ``lora_settings`` the model is frozen and only its peft LoRA adapters train."""
    import torch

    from pipeline import lora
    from pipeline.models.conditioning import build_diffusion_model
    from train.engine import Engine

    torch.manual_seed(0)
    with torch.device(device):
        model = build_diffusion_model(diffusion_preset, activation_checkpointing=checkpointing)
        if lora_settings:
            lora.add_adapters(model, lora_settings)
    return Engine(model, train_config(preset, micro_batch, checkpointing), 0, 1)


def train_step(engine, micro_batch: int, frames: int, seconds: float) -> None:
    """One optimizer step of train/diffusion.py's v-objective on random latents (B, C, frames) and text tokens."""
    import torch

    from train.diffusion import diffusion_loss

    module, device = engine.module, engine.device
    batch = {
        "x": torch.randn(micro_batch, module.cfg.io_channels, frames, device=device),
        "seconds_start": torch.zeros(micro_batch, device=device),
        "seconds_total": torch.full((micro_batch,), seconds, device=device),
    }
    tokens, mask = text_conditioning(module, micro_batch, device)
    loss = diffusion_loss(engine, batch, tokens, mask, 0.1, engine.dtype)
    engine.backward(loss)
    engine.step()
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError("non-finite loss")


def largest_fitting(
    preset: Preset, diffusion_preset: str, frames: int, checkpointing: bool, device, seconds: float, lora_settings=None
):
    """(engine, micro-batch): double the micro-batch until a step runs out of memory; the engine returned is fresh
    when one did (a failed step leaves partial state behind), and None if not even the first fits."""
    engine = new_engine(preset, diffusion_preset, preset.micro_batches[-1], checkpointing, device, lora_settings)
    fits, out_of_memory = None, False
    for micro_batch in preset.micro_batches:
        try:
            train_step(engine, micro_batch, frames, seconds)
            fits = micro_batch
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            out_of_memory = True  # handled below, once the exception (and the activations it holds) is gone
            break
    if not out_of_memory:
        return engine, fits
    del engine
    free(device)
    if not fits:
        return None, None
    return new_engine(preset, diffusion_preset, fits, checkpointing, device, lora_settings), fits


def bench_training(preset: Preset, device) -> list[dict]:
    rows = []
    for label, (diffusion_preset, vae_preset) in preset.models.items():
        for checkpointing in (False, True):
            rows.append(
                training_row(preset, label, diffusion_preset, vae_preset, checkpointing, preset.seconds, device)
            )
    diffusion_preset, vae_preset = preset.models["sa-open"]
    settings, window = lora_recipe()
    seconds = preset.lora_seconds or window
    rows.append(training_row(preset, "sa-open", diffusion_preset, vae_preset, False, seconds, device, settings))
    return rows


def training_row(
    preset: Preset,
    label: str,
    diffusion_preset: str,
    vae_preset: str,
    checkpointing: bool,
    seconds: float,
    device,
    lora_settings: dict | None = None,
) -> dict:
    """Samples/s and peak memory of a training step at the largest micro-batch that fits on ``seconds`` windows."""
    from pipeline.models.autoencoder import AUTOENCODER_PRESETS

    frames = math.ceil(seconds * SAMPLE_RATE / AUTOENCODER_PRESETS[vae_preset].downsampling)
    row = {"model": label, "diffusion_preset": diffusion_preset, "activation_checkpointing": checkpointing}
    row |= {
        "lora_rank": lora_settings["rank"] if lora_settings else 0,
        "zero_stage": 2,
        "precision": preset.precision,
        "window_seconds": seconds,
    }
    row |= {"window_frames": frames, "largest_tried": preset.micro_batches[-1]}
    engine, fits = largest_fitting(preset, diffusion_preset, frames, checkpointing, device, seconds, lora_settings)
    if engine is None:
        return row | {"micro_batch": 0}
    if lora_settings:
        row["trainable_parameters"] = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    train_step(engine, fits, frames, seconds)  # warm-up at that size
    reset_peak(device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(preset.timed_steps):
        train_step(engine, fits, frames, seconds)
    synchronize(device)
    elapsed = time.perf_counter() - started
    row |= {"micro_batch": fits, "steps_timed": preset.timed_steps, "step_s": round(elapsed / preset.timed_steps, 4)}
    row |= {"samples_per_s": round(fits * preset.timed_steps / elapsed, 3), "peak_gib": peak_gib(device)}
    print(json.dumps(row), file=sys.stderr)
    engine.close()
    del engine
    free(device)
    return row


# ----------------------------------------------------------------------------------------------- 3. VAE
def bench_vae(preset: Preset, device) -> list[dict]:
    import torch

    from pipeline.models.autoencoder import build_autoencoder

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

    rows = []
    for vae_preset in dict.fromkeys(v for _, v in preset.models.values()):
        torch.manual_seed(0)
        vae = build_autoencoder(vae_preset, device).eval()
        audio = 0.1 * torch.randn(1, 2, round(preset.seconds * SAMPLE_RATE), device=device)
        row: dict = {"vae_preset": vae_preset, "seconds_audio": preset.seconds}
        results = {}
        with torch.no_grad():
            for precision in ("fp32", "bf16"):
                # bf16 as inference_autocast gives it on CUDA (and the CPU's bf16 autocast for the tiny run)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    vae.encode(audio)  # warm-up: kernels and memory at the full length
                    synchronize(device)
                    started = time.perf_counter()
                    latents = vae.encode(audio)
                    synchronize(device)
                    encoded = time.perf_counter()
                    decoded = vae.decode(results["fp32"][0] if precision == "bf16" else latents)
                    synchronize(device)
                    finished = time.perf_counter()
                results[precision] = (latents, decoded)
                row[f"encode_{precision}_audio_s_per_s"] = round(preset.seconds / (encoded - started), 3)
                row[f"decode_{precision}_audio_s_per_s"] = round(preset.seconds / (finished - encoded), 3)
        row["latents_relative_difference_bf16"] = round(relative(results["bf16"][0], results["fp32"][0]), 6)
        row["decode_relative_difference_bf16"] = round(relative(results["bf16"][1], results["fp32"][1]), 6)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del vae
        free(device)
    return rows


# ----------------------------------------------------------------------------------------------- main
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu.json")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="full (sa1, sa-open; default on CUDA) or tiny (on CPU)"
    )
    parser.add_argument("--sections", default="generation,training,vae", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    from pipeline.components import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"gpu.py: {err}", file=sys.stderr)
        return 2
    # One DeepSpeed rank: the process group DeepSpeed joins (gloo on the CPU, NCCL on CUDA).
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", "29563")
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts (the VAE decode) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    args.preset = args.preset or ("full" if device.type == "cuda" else "tiny")  # `make bench` on a CPU: seconds
    preset = PRESETS[args.preset]
    sections = {"generation": bench_generation, "training": bench_training, "vae": bench_vae}
    chosen = [s for s in args.sections.split(",") if s]
    unknown = set(chosen) - set(sections)
    if unknown:
        print(f"gpu.py: --sections: unknown {sorted(unknown)} (choose from {', '.join(sections)})", file=sys.stderr)
        return 2
    if "training" in chosen and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    report: dict = {
        "benchmark": "gpu",
        "preset": args.preset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": {},
    }
    started = time.perf_counter()
    for name in chosen:
        section_started = time.perf_counter()
        report[name] = sections[name](preset, device)
        report["seconds"][name] = round(time.perf_counter() - section_started, 1)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    if dist.is_initialized():
        dist.destroy_process_group()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
