"""CLAP over VAE latents: a RoBERTa-style text encoder and a latent audio encoder trained with symmetric InfoNCE.

Stable Audio (Evans et al. 2024, §4.2) conditions its diffusion model on the *penultimate* layer of a CLAP text
encoder trained from scratch on the dataset. Our audio tower reads the VAE latents that preprocessing already
stored, so CLAP training never decodes audio.

    ids (B, L), mask (B, L)  -> TextEncoder -> h (B, L, D_t) -> h[:, 0] (<s>; tiny: masked mean) -> projection -> (B, P)
                                     `-> penultimate layer (B, L, D_t): the diffusion model's text conditioning
    latents (B, C, T), mask (B, T) -> AudioEncoder -> masked mean (B, D_a) -> projection -> l2 norm -> (B, P)

Masks are bool with True = a real token / frame. Imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class TextEncoderConfig:
    vocab_size: int = 8000  # token ids, specials included; set from the trained tokenizer
    width: int = 768  # D_t, hidden size (RoBERTa-base: 768)
    layers: int = 12  # transformer blocks
    heads: int = 12  # attention heads; must divide width
    mlp_ratio: float = 4.0  # MLP hidden size / width
    max_tokens: int = 77  # learned positions = longest tokenized caption, <s> and </s> included
    dropout: float = 0.1  # on embeddings, attention weights and residual branches (RoBERTa: 0.1)
    pre_norm: bool = False  # False = RoBERTa's post-LN blocks; True = pre-LN with a final LayerNorm
    pooling: str = "first"  # caption embedding: "first" = the <s> state (RoBERTa, CLAP); "mean" = masked token mean

    def __post_init__(self) -> None:
        _check_transformer("text", self.width, self.layers, self.heads, self.mlp_ratio, self.dropout)
        if self.pooling not in ("first", "mean"):
            raise ValueError(f"text: pooling must be 'first' or 'mean', got {self.pooling!r}")
        if self.vocab_size < 1 or self.max_tokens < 2:
            raise ValueError(
                f"text: vocab_size >= 1 and max_tokens >= 2 needed, got {self.vocab_size}, {self.max_tokens}"
            )


@dataclass
class AudioEncoderConfig:
    latent_channels: int = 64  # C of the VAE latents (sa1 and sa-open VAEs: 64)
    width: int = 512  # D_a, hidden size of the transformer
    layers: int = 8  # transformer blocks (pre-LN)
    heads: int = 8  # attention heads; must divide width
    mlp_ratio: float = 4.0  # MLP hidden size / width
    downsample: int = 4  # stride of the conv stem: latent frames per transformer token
    dropout: float = 0.1  # on attention weights and residual branches

    def __post_init__(self) -> None:
        _check_transformer("audio", self.width, self.layers, self.heads, self.mlp_ratio, self.dropout)
        if self.latent_channels < 1 or self.downsample < 1:
            raise ValueError(
                f"audio: latent_channels and downsample must be >= 1, got {self.latent_channels}, {self.downsample}"
            )


@dataclass
class ClapConfig:
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # text tower
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)  # latent audio tower
    projection_dim: int = 512  # P, the shared embedding size
    logit_scale_init: float = math.log(1 / 0.07)  # initial log inverse temperature (CLIP/CLAP)
    logit_scale_max: float = math.log(100.0)  # clamp on the log inverse temperature, for stability

    def __post_init__(self) -> None:
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {self.projection_dim}")
        if self.logit_scale_init > self.logit_scale_max:
            raise ValueError("logit_scale_init must not exceed logit_scale_max")


def _check_transformer(name: str, width: int, layers: int, heads: int, mlp_ratio: float, dropout: float) -> None:
    if width < 1 or layers < 1 or heads < 1 or width % heads:
        raise ValueError(
            f"{name}: need width, layers, heads >= 1 and heads dividing width, got {width}, {layers}, {heads}"
        )
    if mlp_ratio <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: need mlp_ratio > 0 and 0 <= dropout < 1, got {mlp_ratio}, {dropout}")


CLAP_PRESETS: dict[str, ClapConfig] = {
    # CPU tests and the demo: ~0.23M parameters plus 64 per vocabulary entry (0.74M at an 8k vocabulary).
    # Dropout 0.1 in both towers: on the demo's 77 training captions, held-out recall@1 among 10 pieces was 0.3-0.4
    # at every checkpoint to 1000 steps with it, 0.1-0.3 without (single-process replays, docs/architecture.md).
    # 77 tokens as sa1: at 32, 29 % of the demo's captions lost their last fields (tempo, metre, key, sometimes
    # the instrument), for CLAP and for the diffusion model it conditions. Stride 4 as sa1: a quarter of the tokens,
    # ~4x faster steps; held-out recall is the same within seed noise (docs/architecture.md, "Models that learn").
    # Captions pooled by their token mean (sa1 / sa-open keep RoBERTa's <s>): with lr 1e-3 and half the caption
    # fields dropped in training (configs/tiny/clap.yaml), held-out recall@1 among the demo's 20 pieces averaged 0.18
    # over 10 seeds of the real loop; the <s> state gave 0.12 (5 seeds), and 0.04 without the field dropout.
    "tiny": ClapConfig(
        text=TextEncoderConfig(width=64, layers=2, heads=2, max_tokens=77, dropout=0.1, pooling="mean"),
        audio=AudioEncoderConfig(latent_channels=64, width=64, layers=2, heads=2, downsample=4, dropout=0.1),
        projection_dim=64,
    ),
    # The paper's VAE: 64 channels at 44100 / 1024 ≈ 43 latent frames/s; stride 4 gives ≈ 11 tokens/s.
    "sa1": ClapConfig(
        text=TextEncoderConfig(width=768, layers=12, heads=12, max_tokens=77),
        audio=AudioEncoderConfig(latent_channels=64, width=512, layers=8, heads=8, downsample=4),
        projection_dim=512,
    ),
    # Oobleck: 64 channels at 44100 / 2048 ≈ 21.5 frames/s; stride 2 keeps ≈ 11 tokens/s.
    "sa-open": ClapConfig(
        text=TextEncoderConfig(width=768, layers=12, heads=12, max_tokens=77),
        audio=AudioEncoderConfig(latent_channels=64, width=512, layers=8, heads=8, downsample=2),
        projection_dim=512,
    ),
}
CLAP_PRESETS["tiny-open"] = CLAP_PRESETS["tiny"]  # tiny-open differs from tiny in the diffusion model only


# ---------------------------------------------------------------------------------------------------------------------
# Blocks shared by both towers


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape  # x (B, L, D), key_mask (B, L) bool
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, Dh)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Transformer encoder block; post-LN as in BERT/RoBERTa, or pre-LN."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = SelfAttention(width, heads, dropout)
        self.norm1 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norm2 = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), key_mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, key_mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


def _safe_key_mask(mask: torch.Tensor) -> torch.Tensor:
    # A row with no valid key would make softmax 0/0 = NaN; let such a row attend to its first position instead
    # (its embedding is meaningless either way, but it must not poison the batch's loss).
    mask = mask.clone()
    mask[:, 0] |= ~mask.any(dim=1)
    return mask


def _init_weights(module: nn.Module) -> None:
    # BERT/RoBERTa initialisation for the transformers; the conv stem keeps PyTorch's fan-in scaled default so that
    # the latents' content is not drowned by the unit-scale position table at the start of training.
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------------------
# Text tower


class TextEncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, L, D_t)
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings then each block's output, layers + 1 of (B, L, D_t)


class TextEncoder(nn.Module):
    """RoBERTa-style encoder: token + learned position embeddings, `layers` blocks, GELU MLPs, padding mask."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_tokens, config.width)
        # Post-LN normalises the embeddings (as RoBERTa does); pre-LN normalises the last block's output instead.
        self.embedding_norm = nn.Identity() if config.pre_norm else nn.LayerNorm(config.width)
        self.final_norm = nn.LayerNorm(config.width) if config.pre_norm else nn.Identity()
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio, config.dropout, config.pre_norm)
            for _ in range(config.layers)
        )

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        if L > self.config.max_tokens:
            raise ValueError(f"text has {L} tokens, more than max_tokens={self.config.max_tokens}")
        positions = torch.arange(L, device=ids.device)
        return self.drop(self.embedding_norm(self.token_embedding(ids) + self.position_embedding(positions)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, output_hidden_states: bool = False) -> TextEncoderOutput:
        """ids (B, L) int64, mask (B, L) bool -> last layer (B, L, D_t) and, if asked, every layer's states."""
        key_mask = _safe_key_mask(mask.bool())
        x = self._embed(ids)  # (B, L, D_t)
        states = [x]
        for block in self.blocks:
            x = block(x, key_mask)
            states.append(x)
        return TextEncoderOutput(self.final_norm(x), tuple(states) if output_hidden_states else None)

    def penultimate(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The input of the last block, (B, L, D_t): what Stable Audio's diffusion model is conditioned on.

        Runs only the first ``layers - 1`` blocks. For pre-LN the final LayerNorm is applied (as with CLIP's
        "clip skip"), so both block styles hand the diffusion model normalised features.
        """
        key_mask = _safe_key_mask(mask.bool())
        x = self._embed(ids)  # (B, L, D_t)
        for block in self.blocks[:-1]:
            x = block(x, key_mask)
        return self.final_norm(x)


# ---------------------------------------------------------------------------------------------------------------------
# Audio tower


def sinusoidal_positions(length: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed sin/cos position table, (length, width): no maximum length, so any latent length encodes."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (T, 1)
    freqs = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(position * freqs)
    table[:, 1::2] = torch.cos(position * freqs[: width // 2])
    return table


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), mask (B, N) bool -> (B, D): the mean over the valid positions (zeros for a row with none)."""
    weights = mask[:, :, None].to(x.dtype)  # (B, N, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class AudioEncoder(nn.Module):
    """VAE latents (B, C, T) -> conv stem (stride `downsample`) -> pre-LN transformer -> masked mean (B, D_a).

    Frames outside ``mask`` are zeroed before the stem and ignored by attention and pooling, so the embedding does
    not depend on how much padding a batch carries.
    """

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.width = config.width
        s = config.downsample
        self.stem = nn.Sequential(
            nn.Conv1d(config.latent_channels, config.width, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv1d(config.width, config.width, kernel_size=s, stride=s),
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio, config.dropout, pre_norm=True)
            for _ in range(config.layers)
        )
        self.final_norm = nn.LayerNorm(config.width)

    def forward(self, latents: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, C, T), mask (B, T) bool or None (all valid) -> pooled (B, D_a)."""
        B, C, T = latents.shape
        if C != self.config.latent_channels:
            raise ValueError(f"latents have {C} channels, the audio encoder expects {self.config.latent_channels}")
        mask = torch.ones(B, T, dtype=torch.bool, device=latents.device) if mask is None else mask.bool()
        s = self.config.downsample
        pad = -T % s
        latents = F.pad(latents * mask[:, None, :], (0, pad))  # (B, C, T + pad)
        mask = F.pad(mask, (0, pad))  # (B, T + pad)
        tokens_mask = mask.view(B, -1, s).any(dim=-1)  # (B, N): a token is valid if any of its frames is
        x = self.stem(latents).transpose(1, 2)  # (B, N, D_a)
        x = self.drop(x + sinusoidal_positions(x.shape[1], self.width, x.device).to(x.dtype))
        key_mask = _safe_key_mask(tokens_mask)
        for block in self.blocks:
            x = block(x, key_mask)
        return masked_mean(self.final_norm(x), tokens_mask)  # (B, D_a)


# ---------------------------------------------------------------------------------------------------------------------
# CLAP


class Projection(nn.Module):
    """Two-layer MLP into the shared space, as LAION-CLAP's projection heads."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClapOutput(NamedTuple):
    loss: torch.Tensor  # () symmetric InfoNCE
    logits: torch.Tensor  # (B_text, B_audio) scaled cosine similarities; logits.T is audio -> text


def info_nce(text_emb: torch.Tensor, audio_emb: torch.Tensor, logit_scale: torch.Tensor) -> ClapOutput:
    """Symmetric InfoNCE over a batch of matching pairs (row i of each is a pair), CLIP's loss.

    text_emb (B, P), audio_emb (B, P) L2-normalised; logit_scale is the inverse temperature (already exp'd).
    A distributed caller gathers the embeddings of all ranks first and passes them here.
    """
    logits = logit_scale * text_emb @ audio_emb.T  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return ClapOutput(loss, logits)


class CLAP(nn.Module):
    def __init__(self, config: ClapConfig) -> None:
        super().__init__()
        self.config = config
        self.text = TextEncoder(config.text)
        self.audio = AudioEncoder(config.audio)
        self.text_projection = Projection(config.text.width, config.projection_dim)
        self.audio_projection = Projection(config.audio.width, config.projection_dim)
        self.apply(_init_weights)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))

    @property
    def temperature_inverse(self) -> torch.Tensor:
        """exp(logit_scale) clamped at exp(logit_scale_max); the clamp also stops its gradient there."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp()

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L), mask (B, L) -> (B, P) unit vectors, from the last layer's <s> state or its token mean."""
        states = self.text(ids, mask).last_hidden_state  # (B, L, D_t)
        h = masked_mean(states, mask) if self.config.text.pooling == "mean" else states[:, 0]  # (B, D_t)
        return F.normalize(self.text_projection(h), dim=-1)

    def encode_audio(self, latents: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, C, T), mask (B, T) or None -> (B, P) unit vectors."""
        return F.normalize(self.audio_projection(self.audio(latents, mask)), dim=-1)

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, latents: torch.Tensor, latent_mask: torch.Tensor | None = None
    ) -> ClapOutput:
        """Symmetric InfoNCE loss and (B, B) text->audio logits for a batch of matching (caption, latents) pairs."""
        return info_nce(self.encode_text(ids, mask), self.encode_audio(latents, latent_mask), self.temperature_inverse)

    def text_conditioning(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate text layer (B, L, D_t) and its mask (B, L): the diffusion model's cross-attention input."""
        return self.text.penultimate(ids, mask), mask.bool()


@torch.no_grad()
def recall_at_k(text_emb: torch.Tensor, audio_emb: torch.Tensor, k: int) -> float:
    """Text->audio retrieval: fraction of captions whose own audio (same row) is among the k most similar.

    text_emb (N, P), audio_emb (N, P), compared by dot product (cosine for unit vectors). Ties count against the
    caption: another audio scoring exactly as high as the right one takes rank before it.
    """
    text_emb, audio_emb = torch.as_tensor(text_emb), torch.as_tensor(audio_emb)
    if text_emb.shape != audio_emb.shape or text_emb.ndim != 2:
        raise ValueError(f"need two (N, P) tensors of one shape, got {tuple(text_emb.shape)}, {tuple(audio_emb.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims = text_emb.float() @ audio_emb.float().T  # (N, N)
    own = sims.diagonal()[:, None]  # (N, 1)
    others = ~torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    rank = ((sims >= own) & others).sum(dim=1)  # (N,) number of other audios at least as similar
    return (rank < k).float().mean().item()


def build_clap(preset: str, vocab_size: int, text_pooling: str | None = None) -> CLAP:
    """A freshly initialised CLAP from ``CLAP_PRESETS[preset]`` with the tokenizer's vocabulary size; ``text_pooling``
    overrides the preset's (an export says how it was trained, see :func:`pipeline.components.load_clap`)."""
    if preset not in CLAP_PRESETS:
        raise ValueError(f"model.preset: unknown CLAP preset {preset!r}; choose from {sorted(CLAP_PRESETS)}")
    text = replace(CLAP_PRESETS[preset].text, vocab_size=vocab_size)
    if text_pooling is not None:
        text = replace(text, pooling=text_pooling)
    return CLAP(replace(CLAP_PRESETS[preset], text=text))
