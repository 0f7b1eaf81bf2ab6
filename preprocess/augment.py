"""Seeded audiomentations chains: ``augment.copies: K`` adds K variants of every input.

The chain comes from config as a list of ``{"name": <audiomentations class>, <its arguments>...}``, e.g.::

    augment:
      copies: 2
      seed: 0
      chain:
        - {name: Gain, min_gain_db: -6, max_gain_db: 6, p: 1.0}
        - {name: AddGaussianSNR, min_snr_db: 30, max_snr_db: 50, p: 0.5}

Copy k of an input draws from seed ``H(augment.seed, source_sha256, k)``, so a rerun (or a retried shard) makes
the same variants, and so does the same file under another name. Every segment of one copy is augmented from the
same seed, so a long file's segments share one set of parameters. audiomentations draws from the global
``random`` and ``numpy.random`` states; they are seeded here and restored afterwards.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np

from pipeline.config import ConfigError

SAMPLE_RATE = 44100


def build_chain(chain: list[dict[str, Any]]):
    """An ``audiomentations.Compose`` from config (``None`` for an empty chain); bad entries raise ConfigError."""
    if not chain:
        return None
    import audiomentations

    transforms = []
    for i, entry in enumerate(chain):
        args = dict(entry)
        name = args.pop("name", None)
        cls = getattr(audiomentations, str(name), None) if name else None
        if cls is None or not isinstance(cls, type):
            raise ConfigError(f"augment.chain.{i}.name: {name!r} is not an audiomentations transform")
        try:
            transforms.append(cls(**args))
        except (TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"augment.chain.{i}: {name}: {exc}") from None
    return audiomentations.Compose(transforms)


def copy_seed(base_seed: int, source_sha256: str, copy: int) -> int:
    """The seed of augmented copy ``copy`` (1-based) of a source, from the config seed and the file's content."""
    blob = f"{base_seed}:{source_sha256}:{copy}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little")


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return None  # e.g. a whole noise buffer: too big for metadata, implied by the seed
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def apply(chain, audio: np.ndarray, seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Augment (2, n) float32 at 44.1 kHz with ``seed``; returns the result (same shape class) and, per transform,
    its name, whether it was applied and its drawn parameters (for the sample's ``augmentation`` record)."""
    for transform in chain.transforms:
        transform.parameters = {"should_apply": None}  # drop what an earlier call drew
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed)
        out = chain(samples=np.ascontiguousarray(audio, np.float32), sample_rate=SAMPLE_RATE)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    applied = []
    for transform in chain.transforms:
        params = {k: _json_value(v) for k, v in transform.parameters.items() if k != "should_apply"}
        applied.append(
            {
                "name": type(transform).__name__,
                "applied": bool(transform.parameters.get("should_apply")),
                "params": params,
            }
        )
    return np.ascontiguousarray(out, np.float32), applied


def record(seed: int, copy: int, applied: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``augmentation`` metadata of an augmented sample (the original's is ``null``)."""
    return {"copy": copy, "seed": seed, "transforms": applied}
