"""The frozen T5 text encoder of Stable Audio Open: captions → 768-d text tokens for the DiT's cross-attention.

Stable Audio Open conditions on the last hidden layer of a frozen T5-base encoder, at most 128 tokens per caption::

    caption --tokenize (pad to max_tokens, truncate)--> ids (B, L), mask (B, L)
            --T5 encoder (attention mask = mask)-----> hidden (B, L, D)
            --hidden * mask--------------------------> tokens (B, L, D), zero at padded positions

    e.g. L = 6:   ids   [ ▁dog  ▁bark  </s>  <pad>  <pad>  <pad> ]
                  mask  [  1     1      1     0      0      0    ]

The two timing tokens (seconds_start, seconds_total) are appended afterwards by
:class:`pipeline.models.conditioning.ConditionedDiffusionModel`, which also zeros every cross-attention token for the
unconditional branch of classifier-free guidance.

The two reference implementations, diffusers' ``StableAudioPipeline.encode_prompt`` and stable-audio-tools'
``T5Conditioner``, compute the same tokens up to the precision the encoder runs in:

- tokenization: both ``padding="max_length"`` and ``truncation=True``; stable-audio-tools passes ``max_length=128``,
  diffusers the tokenizer's ``model_max_length`` (128 in Stable Audio Open's ``tokenizer/``, written by its conversion
  script). We pass ``max_length=max_tokens`` like stable-audio-tools, whatever the tokenizer's config says.
- attention mask: diffusers gives T5 the tokenizer's 0/1 ints, stable-audio-tools bools; T5 reads both alike.
- masking: both multiply the hidden states by the mask (diffusers twice, which changes nothing), so padded
  positions are exactly 0. Neither DiT masks cross-attention: the zero tokens are attended to (pipeline.weights.dit).
- precision: stable-audio-tools casts T5 to float16 (``.to(torch.float16)``; its ``autocast(...) and
  set_grad_enabled(...)`` enters only the second context), so its tokens are float16 values (made float32 by the
  float mask); diffusers runs T5 in the pipeline's dtype (float32 unless loaded as float16). We run T5 in float32:
  diffusers at float32 exactly; stable-audio-tools' tokens differ by T5's float16 rounding (3e-3 at most on the tiny
  random T5 of the tests, whose tokens are about 0.24 in mean magnitude).
- the null branch of CFG: without a negative prompt both use all-zero cross-attention tokens, the two timing tokens
  included, and keep the global timing vector. With a negative prompt both encode it like a prompt, zero its padded
  positions, and keep the timing tokens in that branch.

The encoder stays outside any ``nn.Module`` we train (this is a plain object), so it never enters a state dict, an
optimizer or DeepSpeed's parameter partitioning. ``transformers`` is imported only when a model is loaded: the
``pipeline`` package is imported by light CLI commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.tracking import download_model

if TYPE_CHECKING:
    from transformers import T5EncoderModel

MAX_TOKENS = 128  # Stable Audio Open's T5 context (stable-audio-tools' max_length)
CONFIG_FILE = "config.json"  # the encoder's T5Config
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # a fast tokenizer's, or the SentencePiece model


class T5Conditioner:
    """A frozen T5 encoder and its tokenizer: captions → (tokens (B, max_tokens, D) float32, mask (B, max_tokens))."""

    def __init__(self, encoder: T5EncoderModel, tokenizer: Any, max_tokens: int = MAX_TOKENS) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._max_tokens = max_tokens

    @classmethod
    def load(cls, uri: str, device: str | torch.device = "cpu", max_tokens: int = MAX_TOKENS) -> T5Conditioner:
        """The T5 encoder and tokenizer saved (``save_pretrained``) in the folder at ``uri``: a local directory, an
        s3:// prefix or an MLflow ``models:/`` / ``runs:/`` URI (:func:`pipeline.tracking.download_model`). The folder
        holds both, or is laid out as a diffusers pipeline (Stable Audio Open's): ``text_encoder/`` and ``tokenizer/``.

        Only local files are read, never the Hugging Face hub. Raises FileNotFoundError naming ``uri`` when there is
        no such folder, or it does not hold a T5 encoder and its tokenizer."""
        missing = (
            f"{uri}: no T5 encoder there (expected config.json and the weights of a T5EncoderModel, and its tokenizer)"
        )
        try:
            root = Path(download_model(uri))
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(missing) from None
        encoder_dir = root / "text_encoder" if (root / "text_encoder" / CONFIG_FILE).is_file() else root
        tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        # without its files AutoTokenizer would build a T5 tokenizer of special tokens only, every word <unk>
        if not (encoder_dir / CONFIG_FILE).is_file() or not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(missing)
        from transformers import AutoTokenizer, T5EncoderModel

        try:
            # float32 whatever the checkpoint's dtype: the tokens' contract, and float16 on a CPU is slow
            encoder = T5EncoderModel.from_pretrained(encoder_dir, local_files_only=True, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except OSError as err:  # transformers' "can't find/load" errors for files absent from the folder
            raise FileNotFoundError(f"{missing}: {err}") from err
        return cls(encoder, tokenizer, max_tokens).to(device)

    @property
    def dim(self) -> int:
        """Width D of the text tokens (T5's d_model: 768 for T5-base)."""
        return int(self.encoder.config.d_model)

    @property
    def max_tokens(self) -> int:
        """Every caption is padded or truncated to this many tokens (its end-of-sequence token included)."""
        return self._max_tokens

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def to(self, device: str | torch.device) -> T5Conditioner:
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → text tokens (B, max_tokens, D) float32, zero at padded positions, and the mask (B, max_tokens)
        bool (True = a real token, the tokenizer's attention mask), both on the encoder's device."""
        if isinstance(captions, str) or not captions:
            raise ValueError(f"captions must be a non-empty list of strings, got {captions!r}")
        batch = self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)  # (B, L) each
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        # T5 gives padded positions hidden states too; both references zero them (they are not attention-masked)
        tokens = hidden.float() * mask[..., None].float()
        return tokens, mask.bool()
