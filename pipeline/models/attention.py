"""Multi-head attention shared by the U-Net and the DiT: SDPA, grouped k/v heads, partial rotary positions.

One module covers the three uses in Stable Audio:
- self-attention over latent frames (DiT: with rotary positions on the first ``rotary_dim`` channels of each head),
- cross-attention from latent frames to conditioning tokens (text + timing), optionally with fewer k/v heads than
  query heads (grouped-query attention, as Stable Audio Open's DiT uses: 24 query heads, 12 k/v heads),
- a key padding mask ``[B, M]`` (True = attend) for variable-length prompts.

Rotary embeddings use the "rotate half" layout (the two halves of the rotated slice are the real and imaginary
parts), the layout of stable-audio-tools and of diffusers' Stable Audio pipeline, so imported weights see the
positions they were trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed(enabled: bool, block: nn.Module, *args: object) -> torch.Tensor:
    """``block(*args)``; when ``enabled`` and training with gradients, the block's activations are not kept but
    recomputed in backward (activation checkpointing: memory of one block's inputs instead of all its activations,
    for about one more forward per step). The U-Net and the DiT call every block through this."""
    if enabled and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def rotary_cos_sin(
    seq_len: int, rotary_dim: int, base: float = 10000.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary positions 0..seq_len-1.

    Returns two float32 tensors of shape ``(seq_len, rotary_dim)``; frequency ``base**(-2i/rotary_dim)`` is written
    to channels ``i`` and ``i + rotary_dim/2`` (rotate-half layout).
    """
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)  # (R/2,)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (N, R/2)
    angles = torch.cat([angles, angles], dim=-1)  # (N, R)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of each head of x (B, H, N, Dh); the rest pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    first, second = x_rot.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)  # multiplication by i in the complex view
    x_rot = x_rot * cos + rotated_half * sin
    return torch.cat([x_rot.to(x.dtype), x_pass], dim=-1)


def _key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, M) bool, True = attend → (B, 1, 1, M) for SDPA; a row with no valid key attends to all (no NaNs)."""
    mask = mask.bool()
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention: self-attention when ``context_dim`` is None, else cross-attention to a context.

    Args:
        dim: width of the queries' stream (and of the output).
        num_heads: query heads; ``head_dim = dim // num_heads`` unless given.
        context_dim: width of the context tokens (None: self-attention, keys come from x).
        kv_heads: k/v heads (grouped-query attention); must divide num_heads. None = num_heads.
        head_dim: channels per head; None = dim // num_heads.
        qkv_bias: bias on the q/k/v projections.
        out_bias: bias on the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.kv_heads = kv_heads or num_heads
        if num_heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide num_heads ({num_heads})")
        inner, kv_inner = num_heads * self.head_dim, self.kv_heads * self.head_dim
        kv_in = context_dim if context_dim is not None else dim
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(kv_in, kv_inner, bias=qkv_bias)
        self.to_v = nn.Linear(kv_in, kv_inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, N, dim), context (B, M, context_dim) or None, mask (B, M) bool (True = attend) → (B, N, dim).

        ``rotary`` = (cos, sin) of shape (N, R) rotates queries and keys (self-attention only).
        """
        B, N, _ = x.shape
        source = x if context is None else context  # (B, M, ·)
        q = self.to_q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        k = self.to_k(source).view(B, -1, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, M, Dh)
        v = self.to_v(source).view(B, -1, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, M, Dh)
        if rotary is not None:
            if self.is_cross:
                raise ValueError("rotary positions are for self-attention only")
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_heads != self.num_heads:
            # query head h reads k/v head h // group, the grouping of stable-audio-tools and diffusers
            group = self.num_heads // self.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, M, Dh)
        attn_mask = _key_padding_mask(mask) if mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, Dh)
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))
