"""longplay's shared library: configs, storage, shard format, models, diffusion, components, tracking, generation."""

from __future__ import annotations


def load(uri: str, device=None):
    """A trained bundle (local dir, s3:// prefix or ``models:/name@alias``) with ``.generate(prompts, seconds)``, on
    ``device`` ("cpu", "cuda", "cuda:N"; default CUDA when available, else the CPU)."""
    from pipeline.components import load_bundle

    return load_bundle(uri, device)
