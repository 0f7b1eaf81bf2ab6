"""benchmarks/gpu.py runs unchanged on the CPU with the tiny models (issue 13): the same code the GPU figures will
come from, so the script is known to work before a GPU is lent. No speed is asserted: only that every section wrote
its rows with the fields the README and the issue name, and that every figure is a finite number."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _numbers(rows: list[dict], keys: tuple[str, ...]) -> list[float]:
    values = [row[k] for row in rows for k in keys]
    assert all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values), values
    return values


def test_the_gpu_benchmark_runs_on_the_cpu_with_the_tiny_preset(tmp_path):
    env = {**os.environ, "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--preset", "tiny"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert (report["benchmark"], report["preset"], report["device"]) == ("gpu", "tiny", "cpu")
    assert len(report["commit"]) == 40 and report["date"].endswith("Z")

    generation = report["generation"]
    assert [(r["model"], r["batch"]) for r in generation] == [("sa1", 1), ("sa1", 2), ("sa-open", 1), ("sa-open", 2)]
    assert {r["diffusion_preset"] for r in generation} == {"tiny-unet", "tiny"}  # the U-Net and the DiT
    _numbers(generation, ("sample_s", "decode_s", "total_s", "latent_frames"))
    assert all(r["audio_finite"] and r["steps"] == 3 and r["sampler"] == "dpmpp-3m-sde" for r in generation)
    assert all(r["peak_gib_with_decode"] is None for r in generation)  # GPU memory: not measured on the CPU

    training = report["training"]
    assert [(r["model"], r["activation_checkpointing"]) for r in training] == [
        ("sa1", False),
        ("sa1", True),
        ("sa-open", False),
        ("sa-open", True),
        ("sa-open", False),
    ]
    assert [r["lora_rank"] for r in training] == [0, 0, 0, 0, 16]  # the last: LoRA on Open's window (issue 16)
    lora_row = training[-1]
    assert lora_row["window_seconds"] == 2.0 and 0 < lora_row["trainable_parameters"] < 0.2 * _parameters("tiny")
    assert all(r["micro_batch"] == 2 and r["zero_stage"] == 2 for r in training)  # the largest tried fits on CPU
    assert all(r["precision"] == "bf16" for r in training)  # DeepSpeed's bf16 engine, as on the GPU
    _numbers(training, ("step_s", "samples_per_s", "window_frames"))

    (vae,) = report["vae"]
    _numbers([vae], ("encode_fp32_audio_s_per_s", "encode_bf16_audio_s_per_s", "decode_fp32_audio_s_per_s"))
    # bf16 changes the latents a little, never by nothing (then it did not run in bf16) nor wholesale
    assert 0 < vae["latents_relative_difference_bf16"] < 0.1 and 0 < vae["decode_relative_difference_bf16"] < 0.1
    assert set(report["seconds"]) == {"generation", "training", "vae", "total"}


def _parameters(diffusion_preset: str) -> int:
    from pipeline.models.conditioning import build_diffusion_model

    return sum(p.numel() for p in build_diffusion_model(diffusion_preset).parameters())


def test_asking_for_cuda_without_it_exits_2_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA (the benchmark would run in full)")
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cuda"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "CUDA is not available" in out.stderr and not (tmp_path / "gpu.json").exists()


@pytest.mark.parametrize(("memory", "expected"), [(4, 4), (1, 1), (0, None), (99, 8)])
def test_the_largest_micro_batch_is_found_by_doubling_until_out_of_memory(memory, expected, monkeypatch):
    """The search that cannot run out of memory on a CPU, with a stand-in step that does at ``memory`` samples; after
    an out-of-memory step the engine is a fresh one (the failed step left partial state)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_benchmark", gpu)  # dataclasses look their module up there
    spec.loader.exec_module(gpu)
    engines, steps = [], []

    def new_engine(preset, name, micro_batch, checkpointing, device, lora_settings):
        engines.append(micro_batch)
        return f"engine{len(engines)}"

    def train_step(engine, micro_batch, frames, seconds):
        steps.append((engine, micro_batch))
        if micro_batch > memory:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu, "new_engine", new_engine)
    monkeypatch.setattr(gpu, "train_step", train_step)
    preset = gpu.Preset(95.0, 100, 7.0, {}, (1,), (1, 2, 4, 8), 3, "bf16")
    engine, fits = gpu.largest_fitting(preset, "sa1", 4092, False, torch.device("cpu"), 95.0)
    assert fits == expected
    tried = [b for b in (1, 2, 4, 8) if b <= min(memory * 2 or 1, 8)]
    assert [b for _, b in steps] == tried
    if memory >= 8:
        assert (engine, engines) == ("engine1", [8])  # everything fitted: the first engine is kept
    elif fits is None:
        assert engine is None and engines == [8]
    else:
        assert (engine, engines) == ("engine2", [8, fits])
