"""The Stable Audio Open diffusion transformer (DiT).

Latent frames are tokens. A global token (timestep embedding + projected global conditioning, i.e. timing) is
prepended; every block is pre-norm self-attention (rotary positions), cross-attention to the conditioning tokens
(text + timing), and a SwiGLU feed-forward. Zero-initialised 1x1 convolutions wrap the transformer, so at
initialisation the model is a linear map of its input.

    x (B, C, T) ─ +conv1x1 ─ Linear → (B, T, D) ─┐
    t (B,) ─ Fourier ─ MLP ─ + MLP(global) ─ token┴ cat → (B, 1+T, D) ─ 24 x block(·, ctx) ─ drop token
                                                             ─ Linear → (B, C, T) ─ +conv1x1 → v (B, C, T)

With ``input_concat_dim`` > 0, per-frame condition channels (B, Ci, T) are concatenated to x before the first 1x1
conv (stable-audio-tools' ``input_concat_dim``); the tiny preset's timing frames use it (see
``pipeline.models.conditioning``).

Parameter names mirror the structure; ``pipeline.weights.dit`` maps diffusers' ``StableAudioDiTModel`` and
stable-audio-tools' ``DiffusionTransformer`` onto them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.attention import Attention, checkpointed, rotary_cos_sin


@dataclass
class DiTConfig:
    io_channels: int = 64  # C, latent channels in and out
    embed_dim: int = 1536  # D, transformer width
    depth: int = 24  # transformer blocks
    num_heads: int = 24  # attention heads (query heads); head_dim = embed_dim // num_heads
    cond_token_dim: int = 768  # width of the incoming cross-attention tokens (text + timing)
    cross_attn_dim: int = 768  # width of those tokens after the token MLP (the k/v input)
    cross_attn_kv_heads: int = 12  # k/v heads of cross-attention (grouped-query attention; Open: 12)
    global_cond_dim: int = 1536  # width of the global conditioning vector (timing start ‖ total); 0 = none
    timestep_features_dim: int = 256  # random Fourier features of t fed to the timestep MLP
    ff_mult: int = 4  # SwiGLU hidden width / embed_dim
    rotary_dim: int = 32  # channels of each head rotated by rotary positions (Open: 32 of 64)
    rotary_base: float = 10000.0  # rotary frequency base
    norm_eps: float = 1e-5  # LayerNorm epsilon
    use_cross_attn_mask: bool = True  # False = attend to padded tokens too (Open was trained that way)
    input_concat_dim: int = 0  # per-frame condition channels concatenated to x (stable-audio-tools' input_concat)
    activation_checkpointing: bool = False  # training: recompute each block's activations in backward (less memory)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"dit: num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim})")
        head_dim = self.embed_dim // self.num_heads
        if self.num_heads % self.cross_attn_kv_heads:
            raise ValueError(f"dit: cross_attn_kv_heads ({self.cross_attn_kv_heads}) must divide num_heads")
        if self.rotary_dim % 2 or self.rotary_dim > head_dim:
            raise ValueError(f"dit: rotary_dim must be even and <= head_dim ({head_dim}), got {self.rotary_dim}")
        if self.timestep_features_dim % 2:
            raise ValueError(f"dit: timestep_features_dim must be even, got {self.timestep_features_dim}")
        if (
            min(self.io_channels, self.depth, self.cond_token_dim, self.cross_attn_dim) < 1
            or min(self.global_cond_dim, self.input_concat_dim) < 0
        ):
            raise ValueError("dit: io_channels, depth, cond_token_dim, cross_attn_dim must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


DIT_PRESETS: dict[str, DiTConfig] = {
    # Stable Audio Open 1.0: 64-ch latents, D=1536, 24 blocks, 24 heads, 768-d text/timing tokens, 1536-d timing;
    # cross-attention sees the padded T5 positions too (zero vectors), as Open was trained
    "sa-open": DiTConfig(use_cross_attn_mask=False),
    # CPU tests and the demo: 64-ch latents (the tiny VAE's), 64-d CLAP text tokens. 128 wide: at 64 (= the latent
    # channels) it did not learn to leave the frames after seconds_total silent (docs/architecture.md)
    "tiny": DiTConfig(
        io_channels=64,
        embed_dim=128,
        depth=2,
        num_heads=4,
        cond_token_dim=64,
        cross_attn_dim=64,
        cross_attn_kv_heads=2,
        global_cond_dim=128,
        timestep_features_dim=32,
        rotary_dim=8,
    ),
}


class FourierFeatures(nn.Module):
    """t (B,) → [cos(2π f t), sin(2π f t)] (B, 2F) with learned frequencies f ~ N(0, 1) (F = features // 2)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(features // 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t[:, None].to(self.freqs.dtype) * self.freqs[None, :]  # (B, F)
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _mlp(d_in: int, d_out: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out, bias=bias), nn.SiLU(), nn.Linear(d_out, d_out, bias=bias))


class SwiGLU(nn.Module):
    """x → W_out (a ⊙ silu(g)), [a, g] = W_in x (the gate is the second half of W_in's output)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * hidden)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.silu(gate))


class DiTBlock(nn.Module):
    """Pre-norm block: x += SelfAttn(LN x); x += CrossAttn(LN x, ctx); x += SwiGLU(LN x)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.norm_self = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.self_attn = Attention(D, cfg.num_heads)
        self.norm_cross = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.cross_attn = Attention(D, cfg.num_heads, context_dim=cfg.cross_attn_dim, kv_heads=cfg.cross_attn_kv_heads)
        self.norm_ff = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.ff = SwiGLU(D, cfg.ff_mult * D)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm_self(x), rotary=rotary)  # (B, N, D)
        x = x + self.cross_attn(self.norm_cross(x), context=context, mask=context_mask)
        return x + self.ff(self.norm_ff(x))


class DiT(nn.Module):
    """v-predicting diffusion transformer over latents (B, C, T); see the module docstring."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, C = cfg.embed_dim, cfg.io_channels
        Ci = C + cfg.input_concat_dim  # input width: the latents, then the per-frame condition channels
        self.time_features = FourierFeatures(cfg.timestep_features_dim)
        self.to_timestep_embed = nn.Sequential(
            nn.Linear(cfg.timestep_features_dim, D), nn.SiLU(), nn.Linear(D, D)
        )  # biased, unlike the conditioning MLPs (as in Stable Audio Open)
        self.to_cond_embed = _mlp(cfg.cond_token_dim, cfg.cross_attn_dim, bias=False)
        self.to_global_embed = _mlp(cfg.global_cond_dim, D, bias=False) if cfg.global_cond_dim > 0 else None
        self.preprocess_conv = nn.Conv1d(Ci, Ci, 1, bias=False)
        self.project_in = nn.Linear(Ci, D, bias=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.project_out = nn.Linear(D, C, bias=False)
        self.postprocess_conv = nn.Conv1d(C, C, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the 1x1 convs and every residual branch's output, so each block starts as the identity."""
        nn.init.zeros_(self.preprocess_conv.weight)
        nn.init.zeros_(self.postprocess_conv.weight)
        for block in self.blocks:
            nn.init.zeros_(block.self_attn.to_out.weight)
            nn.init.zeros_(block.cross_attn.to_out.weight)
            nn.init.zeros_(block.ff.proj_out.weight)
            nn.init.zeros_(block.ff.proj_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross_attn_cond: torch.Tensor,
        cross_attn_mask: torch.Tensor | None = None,
        global_cond: torch.Tensor | None = None,
        input_concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict v.

        Args:
            x: noisy latents x_t (B, C, T).
            t: diffusion time in [0, 1] (B,); alpha = cos(pi t / 2), sigma = sin(pi t / 2).
            cross_attn_cond: conditioning tokens (B, L, cond_token_dim).
            cross_attn_mask: (B, L) bool, True = real token; ignored if ``use_cross_attn_mask`` is False.
            global_cond: (B, global_cond_dim) or None (= no global conditioning beyond t).
            input_concat: (B, input_concat_dim, T) per-frame conditions, required when ``input_concat_dim`` > 0.
        Returns:
            v prediction (B, C, T).
        """
        B, _, T = x.shape
        global_embed = self.to_timestep_embed(self.time_features(t.expand(B)))  # (B, D)
        if global_cond is not None:
            if self.to_global_embed is None:
                raise ValueError("this DiT has global_cond_dim=0 but got global_cond")
            global_embed = global_embed + self.to_global_embed(global_cond)
        context = self.to_cond_embed(cross_attn_cond)  # (B, L, Dc)
        mask = cross_attn_mask if self.cfg.use_cross_attn_mask else None

        if self.cfg.input_concat_dim:
            if input_concat is None or input_concat.shape != (B, self.cfg.input_concat_dim, T):
                got = None if input_concat is None else tuple(input_concat.shape)
                raise ValueError(f"this DiT takes input_concat of shape {(B, self.cfg.input_concat_dim, T)}, got {got}")
            x = torch.cat([x, input_concat.to(x.dtype)], dim=1)  # (B, C + Ci, T)
        elif input_concat is not None:
            raise ValueError("this DiT has input_concat_dim=0 but got input_concat")
        x = self.preprocess_conv(x) + x  # (B, C [+ Ci], T)
        h = self.project_in(x.transpose(1, 2))  # (B, T, D)
        h = torch.cat([global_embed[:, None, :].to(h.dtype), h], dim=1)  # (B, 1+T, D), global token first
        rotary = rotary_cos_sin(T + 1, self.cfg.rotary_dim, self.cfg.rotary_base, device=h.device)
        for block in self.blocks:
            h = checkpointed(self.cfg.activation_checkpointing, block, h, context, mask, rotary)
        out = self.project_out(h[:, 1:]).transpose(1, 2)  # (B, C, T)
        return self.postprocess_conv(out) + out
