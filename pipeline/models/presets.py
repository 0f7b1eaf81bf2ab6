"""Model presets by name: ``tiny`` (CPU tests), ``tiny-open`` (tiny, conditioned like Open), ``sa1`` (the paper),
``sa-open`` (Stable Audio Open).

Each component keeps its own preset table beside its code; this module only gathers them, so a newcomer can
see in one place what a preset name builds.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.autoencoder import AUTOENCODER_PRESETS, Autoencoder
from pipeline.models.clap import CLAP_PRESETS, build_clap
from pipeline.models.conditioning import DIFFUSION_PRESETS, build_diffusion_model

# The preset registry: the config schema and the CLI read the names here. ``tiny-open`` is tiny with Stable Audio
# Open's conditioning in the diffusion model (T5 tokens, no timing-frame channel): CPU tests of fine-tuning.
PRESETS = ("tiny", "tiny-open", "sa1", "sa-open")
CLAP_VOCAB_SIZE = 8000  # the default BPE vocabulary the tokenizer is trained to


def check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    for table in (AUTOENCODER_PRESETS, CLAP_PRESETS, DIFFUSION_PRESETS):
        assert name in table, f"preset {name} missing from a component table"


def build_components(preset: str, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """Autoencoder, CLAP and diffusion model of a preset, freshly initialised on ``device`` (``meta`` is free)."""
    check_preset(preset)
    with torch.device(device):
        return {
            "autoencoder": Autoencoder(AUTOENCODER_PRESETS[preset]),
            "clap": build_clap(preset, vocab_size=CLAP_VOCAB_SIZE),
            "diffusion": build_diffusion_model(preset),
        }


def parameter_counts(preset: str) -> dict[str, int]:
    """Parameters per component, built on the meta device (no memory, no time)."""
    return {name: sum(p.numel() for p in m.parameters()) for name, m in build_components(preset, "meta").items()}
