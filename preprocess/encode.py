"""The VAE side of preprocessing: which autoencoder ``--vae`` names, and batched encoding of audio segments.

``--vae`` is ``preset:NAME[@seedN]`` (an untrained preset with a seeded init, for tests and benchmarks), a local path
or s3:// URI of an exported autoencoder, an MLflow model URI (``models:/name@alias``, ``runs:/...``), all read by
:func:`pipeline.components.load_vae`, or ``none`` (audio shards: each sample carries FLAC instead of latents). The
driver resolves it once into a :class:`VaeSpec` (its id, config hash, channels and latent rate go into every sample
and the index); every worker loads the same weights and checks their hash against the spec, so one job never mixes
two encoders.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from pipeline import components
from pipeline.config import ConfigError

SAMPLE_RATE = 44100


@dataclass(frozen=True)
class VaeSpec:
    uri: str
    vae_id: str  # "preset:tiny@seed0", "sha256:<16 hex of the weights>" or "none"
    config_hash: str
    latent_channels: int  # for audio shards: 2 (the "latents" are the stereo waveform)
    latent_rate: float  # frames per second; for audio shards 44100
    dtype: str = "float32"  # of the VAE's weights as loaded (float16 weights give other latents)

    @property
    def audio_only(self) -> bool:
        return self.vae_id == "none"


def resolve_vae(uri: str) -> VaeSpec:
    """Load ``--vae`` once on the driver to fix its id; a VAE that cannot be loaded is a usage error (exit 2)."""
    if uri == "none":
        return VaeSpec(uri, "none", "none", 2, float(SAMPLE_RATE))
    try:
        model = components.load_vae(uri)
        vae_id = components.vae_id(uri if uri.startswith("preset:") else model)
    except Exception as exc:  # any failure to load a user-named model is a usage error, reported in one line
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"--vae: cannot load {uri!r} ({type(exc).__name__}: {message})") from None
    cfg_hash = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return VaeSpec(uri, vae_id, cfg_hash, model.latent_channels, float(model.latent_rate), dtype)


def check_loaded(model, spec: VaeSpec) -> None:
    """A worker's copy of the VAE must be the one the driver resolved (an s3 object may change mid-job)."""
    if spec.uri.startswith("preset:") or model is None:
        return
    got = components.vae_id(model)
    if got != spec.vae_id:
        raise RuntimeError(f"--vae {spec.uri}: worker loaded weights {got}, the job started with {spec.vae_id}")


def encode(
    model, pieces: list[np.ndarray], batch_size: int, chunk_seconds: float, device: str = "cpu"
) -> list[np.ndarray]:
    """Latents for each (2, n_i) float32 piece at 44.1 kHz: float16 (C, ceil(n_i / D)), in input order.

    Only pieces of equal length share a batch: right-padding a shorter piece would let the encoder's biases leak
    into its last frames, so a piece's latents would depend on its batch neighbours. Pieces longer than
    ``chunk_seconds`` go through the chunked encoder (bounded memory, same result up to float rounding).
    """
    import torch

    out: list[np.ndarray | None] = [None] * len(pieces)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, piece in enumerate(pieces):
        by_length[piece.shape[-1]].append(i)
    with torch.inference_mode():
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), batch_size):
                group = indices[start : start + batch_size]
                audio = torch.from_numpy(np.stack([pieces[i] for i in group]))  # (B, 2, n)
                if torch.device(device).type == "cuda":  # a pinned copy goes over without blocking the host
                    audio = audio.pin_memory().to(device, non_blocking=True)
                else:
                    audio = audio.to(device)
                if length > chunk_seconds * SAMPLE_RATE:
                    latents = model.encode_chunked(audio, chunk_seconds=chunk_seconds)
                else:
                    latents = model.encode(audio)  # (B, C, ceil(n / D))
                latents = latents.float().cpu().numpy().astype(np.float16)
                for i, z in zip(group, latents, strict=True):
                    out[i] = z
    return out  # type: ignore[return-value]
