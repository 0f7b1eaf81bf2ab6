"""Text conditioners: captions → the diffusion model's text tokens, whichever encoder a model was trained with.

    captions ─ClapText─→ our CLAP's penultimate text layer (the paper's Stable Audio 1.0 conditioning)
    captions ─T5Conditioner (pipeline.t5)─→ a frozen T5 encoder's last hidden states (Stable Audio Open)

Both give ``encode(captions) -> (tokens (B, L, D) float32, mask (B, L) bool)`` on their device, and ``to(device)``.
Training, generation and the held-out scores call only that, so a model conditioned on either trains, samples and
exports the same way; ``model.text_encoder`` in the config (and ``text_encoder`` in a bundle's config.json) says
which one a model uses; ``pipeline.components.load_text_conditioner`` loads either by URI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.models.clap import CLAP
from pipeline.text import CaptionTokenizer

TEXT_ENCODERS = ("clap", "t5")


class TextConditioner(Protocol):
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def to(self, device: str | torch.device) -> TextConditioner: ...


@dataclass
class ClapText:
    """Our CLAP's text tower (frozen) and its caption tokenizer, as a text conditioner."""

    clap: CLAP
    tokenizer: CaptionTokenizer

    @property
    def max_tokens(self) -> int:
        return self.clap.config.text.max_tokens

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.clap.parameters()).device
        encoded = self.tokenizer.encode_batch(list(captions), self.max_tokens)
        ids, mask = (torch.from_numpy(a).to(device) for a in encoded)
        return self.clap.text_conditioning(ids, mask)

    def to(self, device: str | torch.device) -> ClapText:
        self.clap.to(device)
        return self
