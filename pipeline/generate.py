"""Generation from a trained bundle (SPEC §8, §11): text + seconds → 44.1 kHz stereo, trimmed to the request.

A bundle is the diffusion export ``longplay train diffusion`` writes (and registers in MLflow)::

    model.safetensors  config.json {"kind": "diffusion", "preset", "latent_rate", "window_seconds", ...}
    clap/              model.safetensors, tokenizer.json, config.json {"kind": "clap", "preset", "vocab_size"}
                       (or, with "text_encoder": "t5" in config.json, "t5": the T5 encoder's URI, not copied)
    autoencoder/       model.safetensors, config.json (the VAE the latents were encoded with)

A LoRA fine-tune exports only its adapters: config.json then names the base bundle ("base") and the adapters'
settings ("lora"), and ``pipeline.components.load_bundle`` loads the base and adds the adapters.

Timing follows the paper: the model samples a latent window at least as long as its training window and is told
``seconds_start`` / ``seconds_total``; the decoded audio is cut to exactly ``round(seconds * 44100)`` samples.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.diffusion import SAMPLERS, sample
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.clap import CLAP
from pipeline.models.conditioning import ConditionedDiffusionModel, guided_model_fn
from pipeline.text import CaptionTokenizer
from pipeline.text_conditioners import ClapText, TextConditioner

CPU_BF16_ENV = "LONGPLAY_CPU_BF16"  # "0": model calls on the CPU stay in fp32


@functools.cache
def cpu_bf16() -> bool:
    """Whether inference on the CPU runs under bf16 autocast: where the CPU has native bf16 matrix instructions
    (avx512_bf16 or AMX; oneDNN then runs bf16 matmuls about twice as fast as fp32), unless LONGPLAY_CPU_BF16=0.
    CPUs without them would emulate bf16, slower than fp32, so they stay in fp32."""
    if os.environ.get(CPU_BF16_ENV, "1") == "0":
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no way to ask here, stay in fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def inference_autocast(device: torch.device, cpu: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast for the frozen encoders and the sampler's model calls (matmuls, convolutions and attention in
    bf16; the sampler's own state stays fp32): always on CUDA, and on the CPU where :func:`cpu_bf16` says it pays
    (measured on this project's 2-core AMD EPYC with avx512_bf16: the DiT forward 2.0x faster, v within 0.4 %) unless
    ``cpu`` is False (the training loop's text encoding: a CPU run's training inputs stay fp32, as before).
    The VAE decode runs outside it, in fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu and cpu_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Bundle:
    """A trained model ready to generate: frozen VAE, frozen text conditioner (CLAP or T5), diffusion model."""

    autoencoder: Autoencoder
    text: TextConditioner
    diffusion: ConditionedDiffusionModel
    config: dict[str, Any]
    text_source: tuple[str, str] | None = None  # (kind, URI) the text conditioner was loaded from, when known

    @property
    def clap(self) -> CLAP | None:
        """The CLAP the model is conditioned on (evaluation embeds with it), or None for a T5-conditioned model."""
        return self.text.clap if isinstance(self.text, ClapText) else None

    @property
    def tokenizer(self) -> CaptionTokenizer | None:
        return self.text.tokenizer if isinstance(self.text, ClapText) else None

    @property
    def sample_rate(self) -> int:
        return self.autoencoder.sample_rate

    @property
    def device(self) -> torch.device:
        """Where the diffusion model is (the VAE and CLAP are expected beside it); inputs are made there."""
        return next(self.diffusion.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seconds: float,
        seconds_start: float = 0.0,
        steps: int = 50,
        cfg_scale: float = 6.0,
        seed: int = 0,
        sampler: str = "dpmpp-3m-sde",
        trim: bool = True,
    ) -> list[np.ndarray]:
        """One float32 array (2, round(seconds * 44100)) per prompt; the same seed gives the same audio.

        ``trim=False`` returns the model's whole output window instead (at least the training window), which is what
        timing accuracy measures: content running past the requested length is visible only there."""
        if seconds <= 0:
            raise ValueError("seconds: must be positive")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
        return [self._one(p, seconds, seconds_start, steps, cfg_scale, seed, sampler, trim) for p in prompts]

    def _one(
        self,
        prompt: str,
        seconds: float,
        seconds_start: float,
        steps: int,
        cfg_scale: float,
        seed: int,
        sampler: str,
        trim: bool = True,
    ) -> np.ndarray:
        # One prompt per sampling call: its noise then depends only on the seed, not on the rest of the batch.
        rate = float(self.config["latent_rate"])
        window = max(1, round(float(self.config.get("window_seconds", seconds)) * rate))
        frames = max(window, math.ceil(seconds * rate))
        device = self.device
        with inference_autocast(device):  # bf16 on CUDA: the text encoder and every model call of the sampler
            tokens, token_mask = self.text.encode([prompt])
            model_fn = guided_model_fn(
                self.diffusion,
                tokens,
                token_mask,
                torch.tensor([float(math.floor(seconds_start))], device=device),
                torch.tensor([float(math.ceil(seconds_start + seconds))], device=device),  # the paper's ceil(duration)
                cfg_scale,
            )
            shape = (1, self.autoencoder.latent_channels, frames)
            latents = sample(model_fn, shape, steps, sampler, seed=seed, device=device)
        audio = self.autoencoder.decode(latents.float()).clamp(-1, 1)[0]  # fp32 decode: (2, frames * downsampling)
        return (audio[:, : round(seconds * self.sample_rate)] if trim else audio).float().cpu().numpy()


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """(2, N) float32 → 24-bit PCM wav (local path or s3://)."""
    import io

    import soundfile as sf

    from pipeline import storage

    buf = io.BytesIO()
    sf.write(buf, audio.T, sample_rate, format="WAV", subtype="PCM_24")
    storage.write_bytes(path, buf.getvalue())
    return Path(path)
