"""Convolutional building blocks of the Stable Audio autoencoder (paper §3.1, after DAC and Oobleck).

Everything here works on (B, C, T) tensors and keeps T unchanged, except the strided down/up-sampling
convolutions at the end (encoder) or start (decoder) of a block, which divide or multiply T by the stride.

    EncoderBlock(c_in → c_out, stride s):   (B, c_in, T) → (B, c_out, T / s)
        ResidualUnit(dil 1) → ResidualUnit(dil 3) → ResidualUnit(dil 9) → SnakeBeta → Conv(k=2s, stride s)

    DecoderBlock(c_in → c_out, stride s):   (B, c_in, T) → (B, c_out, T · s)
        SnakeBeta → ConvTranspose(k=2s, stride s) → ResidualUnit(dil 1) → ResidualUnit(dil 3) → ResidualUnit(dil 9)

Weight normalisation (Salimans & Kingma 2016) is optional. When on, it uses
``torch.nn.utils.parametrizations.weight_norm``, so a conv's state-dict keys are
``<name>.parametrizations.weight.original0`` (g, the per-output-channel norm) and ``...original1`` (v, the
direction): the same two tensors that stable-audio-tools and diffusers store as ``weight_g`` / ``weight_v``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

RESIDUAL_DILATIONS = (1, 3, 9)  # the paper's (and DAC's) dilation pattern inside every block
RESIDUAL_KERNEL = 7  # taps of the dilated conv in a residual unit
AUDIO_KERNEL = 7  # taps of the encoder's first and the decoder's last conv, at the audio rate
INFERENCE_TILE_ELEMENTS = 1 << 19  # CPU inference runs long inputs in time tiles of this many elements per thread
MIN_TILE_STEPS = 1024  # and never narrower: the conv library may pick other kernels for very narrow inputs


def time_tile(x: torch.Tensor) -> int | None:
    """Time steps per tile for CPU inference on ``x`` (B, C, T), or None to run it whole: when gradients are on,
    on a GPU (one kernel per op is what it wants), under autocast (bf16 convolutions of other widths round
    differently) or when T is under two tiles. A tile holds about 2 MB (a core's L2 here) per torch thread. Each
    output element is the same sum of the same products as without tiles: the tests check that latents and audio
    are bit-for-bit the same."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return None
    tile = max(INFERENCE_TILE_ELEMENTS * torch.get_num_threads() // (x.shape[0] * x.shape[1]), MIN_TILE_STEPS)
    return tile if x.shape[-1] > 2 * tile else None


class SnakeBeta(nn.Module):
    """Snake activation with separate frequency (alpha) and magnitude (beta) per channel.

    ``y = x + 1 / (exp(beta) + 1e-9) · sin(exp(alpha) · x)²``, parameters stored on a log scale (both start at 0,
    i.e. alpha = beta = 1) so their learning rate is relative. Shapes: parameters (C,), input/output (B, C, T).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp()[None, :, None]  # (1, C, 1)
        # 1e-9 keeps the division finite if beta ever underflows; matches the reference checkpoints' numerics.
        inv_beta = (self.beta.exp()[None, :, None] + 1e-9).reciprocal()
        if torch.is_grad_enabled():
            return torch.addcmul(x, torch.sin(alpha * x).square(), inv_beta)
        tile = time_tile(x)
        if tile is None:
            # One buffer, updated in place; Snake at audio rate is as costly as the convolutions.
            return torch.addcmul(x, (alpha * x).sin_().square_(), inv_beta)
        # The same operations per time tile: the tile's temporary is used while it is still in cache, instead of
        # four passes over a buffer the size of the input in memory.
        out = torch.empty_like(x)
        scratch = torch.empty((*x.shape[:-1], tile), dtype=x.dtype)
        for start in range(0, x.shape[-1], tile):
            part = x[..., start : start + tile]
            buf = scratch[..., : part.shape[-1]]
            torch.mul(part, alpha, out=buf).sin_().square_()
            torch.addcmul(part, buf, inv_beta, out=out[..., start : start + tile])
        return out


def conv1d(
    c_in: int, c_out: int, kernel: int, *, stride: int = 1, dilation: int = 1, bias: bool = True, weight_norm: bool
) -> nn.Module:
    """A 1-D conv, weight-normalised if asked. Padding keeps T unchanged for stride 1 (odd kernels) and makes the
    strided (k = 2s) conv map T → T / s for even s."""
    if stride == 1:
        padding = dilation * (kernel - 1) // 2
    else:
        padding = math.ceil(stride / 2)
    layer = nn.Conv1d(c_in, c_out, kernel, stride=stride, dilation=dilation, padding=padding, bias=bias)
    return _weight_norm(layer) if weight_norm else layer


def conv_transpose1d(c_in: int, c_out: int, stride: int, *, bias: bool = True, weight_norm: bool) -> nn.Module:
    """Up-sampling conv, kernel 2s and padding ceil(s/2): maps T → T · s for even s."""
    layer = nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2), bias=bias)
    return _weight_norm(layer) if weight_norm else layer


class ResidualUnit(nn.Module):
    """x + Conv1x1(Snake(Conv7_dilated(Snake(x)))); (B, C, T) → (B, C, T)."""

    def __init__(self, channels: int, dilation: int, *, bias: bool = True, weight_norm: bool):
        super().__init__()
        self.act1 = SnakeBeta(channels)
        self.conv1 = conv1d(channels, channels, RESIDUAL_KERNEL, dilation=dilation, bias=bias, weight_norm=weight_norm)
        self.act2 = SnakeBeta(channels)
        self.conv2 = conv1d(channels, channels, 1, bias=bias, weight_norm=weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tile = time_tile(x)
        if tile is None:
            return x + self.conv2(self.act2(self.conv1(self.act1(x))))
        # The unit one time tile at a time, each read with the dilated conv's reach on both sides (zeros beyond
        # the input's ends, as the conv's own padding): the four intermediate tensors stay in cache instead of
        # going through memory at the input's size. Every output element sums the same products in the same order.
        reach = self.conv1.padding[0]
        w1, b1, w2, b2 = self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias  # weight norm once
        out = torch.empty_like(x)
        length = x.shape[-1]
        for start in range(0, length, tile):
            end = min(start + tile, length)
            lo, hi = max(start - reach, 0), min(end + reach, length)
            y = self.act1(x[..., lo:hi])
            if hi - lo < end - start + 2 * reach:
                y = F.pad(y, (reach - (start - lo), reach - (hi - end)))
            y = F.conv1d(y, w1, b1, dilation=self.conv1.dilation)
            y = F.conv1d(self.act2(y), w2, b2)
            torch.add(x[..., start:end], y, out=out[..., start:end])
        return out


class EncoderBlock(nn.Module):
    """Three residual units at the input width, then a strided conv: (B, c_in, T) → (B, c_out, T / stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, bias: bool = True, weight_norm: bool):
        super().__init__()
        self.units = nn.ModuleList(
            ResidualUnit(c_in, d, bias=bias, weight_norm=weight_norm) for d in RESIDUAL_DILATIONS
        )
        self.act = SnakeBeta(c_in)
        self.down = conv1d(c_in, c_out, 2 * stride, stride=stride, bias=bias, weight_norm=weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return self.down(self.act(x))


class DecoderBlock(nn.Module):
    """A transposed conv, then three residual units at the output width: (B, c_in, T) → (B, c_out, T · stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, bias: bool = True, weight_norm: bool):
        super().__init__()
        self.act = SnakeBeta(c_in)
        self.up = conv_transpose1d(c_in, c_out, stride, bias=bias, weight_norm=weight_norm)
        self.units = nn.ModuleList(
            ResidualUnit(c_out, d, bias=bias, weight_norm=weight_norm) for d in RESIDUAL_DILATIONS
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.act(x))
        for unit in self.units:
            x = unit(x)
        return x


# ---------------------------------------------------------------------------------------- receptive fields
def encoder_reach(strides: tuple[int, ...], out_kernel: int) -> tuple[int, int]:
    """The encoder's receptive field: latent frame j reads audio samples [j·D − left, j·D + right] (D = the product
    of ``strides``). Returns (left, right), walking back from the output conv (``out_kernel`` taps) through each
    block's strided conv (k = 2s, padding ceil(s/2): it reads inputs [i·s − pad, i·s − pad + 2s − 1]) and its three
    residual units (±3·d each), to the input conv."""
    left = right = (out_kernel - 1) // 2  # the output conv, at the latent rate
    units = sum((RESIDUAL_KERNEL - 1) // 2 * d for d in RESIDUAL_DILATIONS)
    for s in reversed(strides):
        pad = math.ceil(s / 2)
        left = left * s + pad + units
        right = right * s + (2 * s - 1 - pad) + units
    edge = (AUDIO_KERNEL - 1) // 2  # the input conv, at the audio rate
    return left + edge, right + edge


def encoder_context_latents(strides: tuple[int, ...], out_kernel: int) -> int:
    """Latent frames of audio context needed on each side so that a chunk's kept frames equal a full pass, for an
    encoder of these block ``strides`` ending in a conv of ``out_kernel`` taps: the larger of the two sides of
    :func:`encoder_reach`, in whole frames (the first kept frame j reads back to j·D − left; the last reads up to
    j·D + right, and the window holds samples to (j + 1 + context)·D − 1). 8 frames for every preset
    (until 2026-12 this was the whole field on each side, 16, which doubled the recomputed context)."""
    left, right = encoder_reach(strides, out_kernel)
    d = math.prod(strides)
    return max(math.ceil(left / d), math.ceil((right + 1 - d) / d))


def decoder_context_latents(strides: tuple[int, ...], in_kernel: int) -> int:
    """Latent frames of context needed on each side of a decoded chunk (the decoder's receptive field in latents,
    used on both sides, conservatively), for a decoder starting with a conv of ``in_kernel`` taps."""
    span, upsampled = float(in_kernel - 1), 1
    for s in reversed(strides):
        span += 2.0 / upsampled  # a k = 2s transposed conv mixes 2 input steps
        upsampled *= s
        span += sum((RESIDUAL_KERNEL - 1) * d for d in RESIDUAL_DILATIONS) / upsampled
    span += (AUDIO_KERNEL - 1) / upsampled  # output conv
    return math.ceil(span)


def chunk_windows(total: int, chunk: int, context: int) -> list[tuple[int, int, int, int]]:
    """Split [0, total) into cores of ``chunk − 2·context`` frames, each read with ``context`` extra frames on both
    sides (clipped at the ends). Returns (read_start, read_end, core_start, core_end) per window."""
    core = chunk - 2 * context
    if core < 1:
        raise ValueError(f"chunk of {chunk} frames leaves no core after {context} frames of context on each side")
    out = []
    for core_start in range(0, total, core):
        core_end = min(total, core_start + core)
        out.append((max(0, core_start - context), min(total, core_end + context), core_start, core_end))
    return out
