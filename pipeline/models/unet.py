"""The Stable Audio 1.0 1-D U-Net (Evans et al. 2024, §3.3), after audio-diffusion-pytorch's UNet1d.

Levels of residual conv blocks with stride-``factor`` down/up-sampling; transformer stacks (self-attention,
cross-attention to the text + timing tokens, feed-forward) at every level; the diffusion time enters every residual
block as a FiLM scale/shift through a shared "mapping" MLP.

    x (B, 64, T) ─ in-block ─┬─ down 0 (f=1: 2 res, 1 xf) ··························· up 0 (3 res, 1 xf) ─┐
                             │  down 1..3 (f=2,2,4: 2 res, 3 xf) ─ mid (res, 3 xf, res) ─ up 3..1 (3 res, 3 xf) │
                             └────────────────────────────────────── + ────────────────────────────────────────┴─ out

Each down level keeps every residual/transformer output as a skip; the matching up level has one more residual
block than its down level when it has attention, and consumes one skip (concatenated, scaled by 1/sqrt 2) per block.
Lengths: T is right-padded to a multiple of prod(factors) and the output cropped back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.attention import Attention, checkpointed


@dataclass
class UNetConfig:
    in_channels: int = 64  # latent channels in and out
    channels: int = 256  # base width; level i has channels * multipliers[i]
    multipliers: tuple[int, ...] = (4, 4, 4, 5, 5)  # width multipliers: input level, then one per down level
    factors: tuple[int, ...] = (1, 2, 2, 4)  # down/up-sampling factor of each level
    num_blocks: tuple[int, ...] = (2, 2, 2, 2)  # residual blocks per down level
    attentions: tuple[int, ...] = (1, 3, 3, 3, 3)  # transformer blocks per level; the last entry is the bottleneck
    attention_heads: int = 16  # heads; head width = level width // heads
    attention_multiplier: int = 4  # feed-forward hidden width / level width
    attention_norm_groups: int = 32  # GroupNorm groups before each transformer stack
    resnet_groups: int = 16  # GroupNorm groups in residual blocks
    kernel_multiplier_downsample: int = 2  # downsampling conv kernel = factor * this + 1
    mapping_multiplier: int = 4  # width of the time/feature mapping = channels * this
    context_dim: int = 768  # width of the cross-attention tokens (text + timing)
    global_cond_dim: int = 0  # width of optional global features added to the mapping; 0 = none (sa1)
    use_skip_scale: bool = True  # scale skips by 1/sqrt(2) before concatenation
    activation_checkpointing: bool = False  # training: recompute each residual / transformer block's activations

    def __post_init__(self) -> None:
        levels = len(self.factors)
        if len(self.multipliers) != levels + 1 or len(self.num_blocks) != levels or len(self.attentions) != levels + 1:
            raise ValueError(
                "unet: need len(multipliers) == len(attentions) == len(factors) + 1 == len(num_blocks) + 1"
            )
        for m in self.multipliers:
            width = self.channels * m
            if width % self.attention_heads or width % self.resnet_groups or width % self.attention_norm_groups:
                raise ValueError(f"unet: width {width} must be divisible by heads and both GroupNorm group counts")
        if self.kernel_multiplier_downsample % 2:
            raise ValueError("unet: kernel_multiplier_downsample must be even")

    @property
    def downsampling(self) -> int:
        return math.prod(self.factors)


UNET_PRESETS: dict[str, UNetConfig] = {
    # Stable Audio 1.0 (stable-audio-tools stable_audio_1_0.json, adp_cfg_1d)
    "sa1": UNetConfig(),
    # CPU tests: 64-ch latents (the tiny VAE's), 64-d CLAP text tokens
    "tiny": UNetConfig(
        in_channels=64,
        channels=32,
        multipliers=(1, 2, 2),
        factors=(2, 2),
        num_blocks=(1, 1),
        attentions=(0, 1, 1),
        attention_heads=4,
        attention_multiplier=2,
        attention_norm_groups=8,
        resnet_groups=8,
        mapping_multiplier=2,
        context_dim=64,
    ),
}


class LearnedTimeFeatures(nn.Module):
    """t (B,) → [t, sin(2π w t), cos(2π w t)] (B, dim + 1) with learned w (dim // 2 frequencies)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t[:, None].to(self.weights.dtype)  # (B, 1)
        angles = 2 * math.pi * t * self.weights[None, :]  # (B, dim/2)
        return torch.cat([t, angles.sin(), angles.cos()], dim=-1)


class ResnetBlock(nn.Module):
    """GN → SiLU → conv3, then GN → FiLM(mapping) → SiLU → conv3, plus a (1x1-projected) skip."""

    def __init__(self, c_in: int, c_out: int, groups: int, mapping_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv1d(c_in, c_out, 3, padding=1)
        self.to_scale_shift = nn.Linear(mapping_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, T)
        scale, shift = self.to_scale_shift(F.silu(mapping))[:, :, None].chunk(2, dim=1)  # (B, c_out, 1) each
        h = self.conv2(F.silu(self.norm2(h) * (scale + 1) + shift))
        return h + self.skip(x)


class TransformerBlock(nn.Module):
    """x += SelfAttn(LN x); x += CrossAttn(LN x, LN ctx); x += FF(x) (the adp block: no norm before the FF)."""

    def __init__(self, dim: int, heads: int, ff_mult: int, context_dim: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, out_bias=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim)
        self.cross_attn = Attention(dim, heads, context_dim=context_dim, out_bias=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm_self(x))  # (B, T, D)
        x = x + self.cross_attn(self.norm_cross(x), context=self.norm_context(context), mask=context_mask)
        return x + self.ff(x)


class Transformer(nn.Module):
    """(B, C, T) → GN → 1x1 conv → blocks over time → 1x1 conv → (B, C, T)."""

    def __init__(self, cfg: UNetConfig, channels: int, depth: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = nn.GroupNorm(cfg.attention_norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv1d(channels, channels, 1)
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(channels, cfg.attention_heads, cfg.attention_multiplier, cfg.context_dim)
                for _ in range(depth)
            ]
        )
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.proj_in(self.norm(x)).transpose(1, 2)  # (B, T, C)
        for block in self.blocks:
            h = checkpointed(self.cfg.activation_checkpointing, block, h, context, context_mask)
        return self.proj_out(h.transpose(1, 2))  # (B, C, T)


class Downsample(nn.Module):
    """Strided conv, kernel ``factor * k + 1``; padded so that T → T / factor (T divisible by factor)."""

    def __init__(self, c_in: int, c_out: int, factor: int, kernel_multiplier: int) -> None:
        super().__init__()
        kernel = factor * kernel_multiplier + 1
        total = kernel - factor
        self.pad = (total - total // 2, total // 2)  # the extra sample goes left, as in adp
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class Upsample(nn.Module):
    """T → T * factor: a transposed conv (kernel 2 * factor) trimmed by factor; factor 1: a plain conv3."""

    def __init__(self, c_in: int, c_out: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        if factor == 1:
            self.conv: nn.Module = nn.Conv1d(c_in, c_out, 3, padding=1)
        else:
            self.conv = nn.ConvTranspose1d(c_in, c_out, 2 * factor, stride=factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.factor == 1:
            return y
        left = self.factor - self.factor // 2  # output length (T + 1) * f, trim f
        return y[..., left : y.shape[-1] - self.factor // 2]


class DownLevel(nn.Module):
    """Downsample, residual blocks, transformer; returns x and every intermediate output as skips."""

    def __init__(self, cfg: UNetConfig, i: int, mapping_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        c_in, c_out = cfg.channels * cfg.multipliers[i], cfg.channels * cfg.multipliers[i + 1]
        self.downsample = Downsample(c_in, c_out, cfg.factors[i], cfg.kernel_multiplier_downsample)
        self.blocks = nn.ModuleList(
            [ResnetBlock(c_out, c_out, cfg.resnet_groups, mapping_dim) for _ in range(cfg.num_blocks[i])]
        )
        self.transformer = Transformer(cfg, c_out, cfg.attentions[i]) if cfg.attentions[i] else None

    def forward(
        self, x: torch.Tensor, mapping: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.downsample(x)
        skips = []
        for block in self.blocks:
            x = checkpointed(self.cfg.activation_checkpointing, block, x, mapping)
            skips.append(x)
        if self.transformer is not None:
            x = self.transformer(x, context, context_mask)
            skips.append(x)
        return x, skips


class UpLevel(nn.Module):
    """Residual blocks each eating one skip, transformer, then upsample to the next level's width."""

    def __init__(self, cfg: UNetConfig, i: int, mapping_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        c, c_out = cfg.channels * cfg.multipliers[i + 1], cfg.channels * cfg.multipliers[i]
        n_blocks = cfg.num_blocks[i] + (1 if cfg.attentions[i] else 0)  # one per skip of the down level
        self.skip_scale = 2**-0.5 if cfg.use_skip_scale else 1.0
        self.blocks = nn.ModuleList([ResnetBlock(2 * c, c, cfg.resnet_groups, mapping_dim) for _ in range(n_blocks)])
        self.transformer = Transformer(cfg, c, cfg.attentions[i]) if cfg.attentions[i] else None
        self.upsample = Upsample(c, c_out, cfg.factors[i])

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        mapping: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        for block in self.blocks:
            x_skip = torch.cat([x, skips.pop() * self.skip_scale], dim=1)  # (B, 2c, T)
            x = checkpointed(self.cfg.activation_checkpointing, block, x_skip, mapping)  # (B, c, T)
        if self.transformer is not None:
            x = self.transformer(x, context, context_mask)
        return self.upsample(x)


class UNet1d(nn.Module):
    """v-predicting 1-D U-Net over latents (B, C, T) with cross-attention conditioning; see the module docstring."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mapping_dim = cfg.channels * cfg.mapping_multiplier
        width0 = cfg.channels * cfg.multipliers[0]
        self.time_features = LearnedTimeFeatures(cfg.channels)
        self.to_time = nn.Linear(cfg.channels + 1, mapping_dim)
        self.to_global = nn.Linear(cfg.global_cond_dim, mapping_dim) if cfg.global_cond_dim > 0 else None
        self.to_mapping = nn.Sequential(
            nn.Linear(mapping_dim, mapping_dim), nn.GELU(), nn.Linear(mapping_dim, mapping_dim), nn.GELU()
        )
        self.in_block = ResnetBlock(cfg.in_channels, width0, 1, mapping_dim)
        self.downs = nn.ModuleList([DownLevel(cfg, i, mapping_dim) for i in range(len(cfg.factors))])
        c_mid = cfg.channels * cfg.multipliers[-1]
        self.mid_block1 = ResnetBlock(c_mid, c_mid, cfg.resnet_groups, mapping_dim)
        self.mid_transformer = Transformer(cfg, c_mid, cfg.attentions[-1]) if cfg.attentions[-1] else None
        self.mid_block2 = ResnetBlock(c_mid, c_mid, cfg.resnet_groups, mapping_dim)
        self.ups = nn.ModuleList([UpLevel(cfg, i, mapping_dim) for i in reversed(range(len(cfg.factors)))])
        self.out_block = ResnetBlock(width0, cfg.in_channels, 1, mapping_dim)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross_attn_cond: torch.Tensor,
        cross_attn_mask: torch.Tensor | None = None,
        global_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict v.

        Args:
            x: noisy latents x_t (B, C, T); any T (right-padded internally to a multiple of ``cfg.downsampling``).
            t: diffusion time in [0, 1] (B,).
            cross_attn_cond: conditioning tokens (B, L, context_dim).
            cross_attn_mask: (B, L) bool, True = real token.
            global_cond: (B, global_cond_dim), only if the config has global_cond_dim > 0.
        Returns:
            v prediction (B, C, T).
        """
        B, _, T = x.shape
        mapping = F.gelu(self.to_time(self.time_features(t.expand(B))))  # (B, M)
        if global_cond is not None:
            if self.to_global is None:
                raise ValueError("this U-Net has global_cond_dim=0 but got global_cond")
            mapping = mapping + F.gelu(self.to_global(global_cond))
        mapping = self.to_mapping(mapping)

        pad = -T % self.cfg.downsampling
        x = F.pad(x, (0, pad))  # (B, C, T')
        x = self.in_block(x, mapping)  # (B, width0, T')
        in_skip, skips = x, []
        for down in self.downs:
            x, level_skips = down(x, mapping, cross_attn_cond, cross_attn_mask)
            skips.append(level_skips)
        every = self.cfg.activation_checkpointing
        x = checkpointed(every, self.mid_block1, x, mapping)
        if self.mid_transformer is not None:
            x = self.mid_transformer(x, cross_attn_cond, cross_attn_mask)
        x = checkpointed(every, self.mid_block2, x, mapping)
        for up in self.ups:
            x = up(x, skips.pop(), mapping, cross_attn_cond, cross_attn_mask)
        x = x + in_skip
        return self.out_block(x, mapping)[..., :T]
