"""The Stable Audio variational autoencoder (Evans et al. 2024, §3.1): 44.1 kHz stereo ⇄ latents.

A fully convolutional encoder/decoder (DAC / Oobleck family) with SnakeBeta activations and a VAE bottleneck:

    audio (B, 2, N) ─pad→ (B, 2, N') ─Encoder→ (B, 2C, T) ─split→ mean, scale ─VAE→ latents (B, C, T)
    latents (B, C, T) ─Decoder→ audio (B, 2, T · D)          with D = prod(strides), T = N' / D = ceil(N / D)

Three presets: ``sa1`` (the paper's 133M model, D = 1024), ``sa-open`` (Stable Audio Open's "Oobleck", D = 2048,
~156M) and ``tiny`` (CPU tests). This module imports only torch: reading and writing weights (our export,
stable-audio-tools, diffusers) is :mod:`pipeline.weights.autoencoder`, loading by URI :mod:`pipeline.components`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pipeline.models.blocks import (
    AUDIO_KERNEL,
    DecoderBlock,
    EncoderBlock,
    ResidualUnit,
    SnakeBeta,
    chunk_windows,
    conv1d,
    decoder_context_latents,
    encoder_context_latents,
)


@dataclass
class AutoencoderConfig:
    """Architecture of an :class:`Autoencoder`; every field is JSON-serialisable (see ``to_dict``/``from_dict``)."""

    audio_channels: int = 2  # waveform channels in and out (2 = stereo)
    sample_rate: int = 44100  # Hz the model was trained at; inputs must already be at this rate
    latent_channels: int = 64  # C of the latents (B, C, T); the encoder emits 2·C channels (mean, scale)
    strides: tuple[int, ...] = (2, 4, 4, 8, 8)  # encoder down-sampling per stage (even); the decoder reverses them
    encoder_channels: int = 128  # encoder width at the audio end (output of the input conv)
    encoder_multipliers: tuple[int, ...] = (1, 2, 4, 8, 16)  # encoder stage i outputs encoder_channels·m[i] channels
    encoder_out_kernel: int = 3  # taps of the last encoder conv
    encoder_projection: bool = False  # SA1/DAC layout: last conv keeps the full width, then a 1x1 conv → 2·C
    decoder_channels: int = 128  # decoder width at the audio end (input of the output conv)
    decoder_multipliers: tuple[int, ...] = (1, 2, 4, 8, 16)  # decoder width decoder_channels·m[i] (audio end first)
    decoder_in_kernel: int = 7  # taps of the first decoder conv (latents → widest layer)
    decoder_out_bias: bool = False  # bias on the last decoder conv (Oobleck: no, DAC/SA1: yes)
    final_tanh: bool = False  # squash the decoded waveform with tanh (DAC/SA1: yes, Stable Audio Open: no)
    weight_norm: bool = True  # weight-normalised convs, as in DAC/Oobleck (stabilises the adversarial training)
    # Biases on the hidden convs (DAC/Oobleck/SA1: yes). Off, every layer maps 0 to 0 (Snake(0) = 0), so digital
    # silence encodes to the zero latent and the zero latent decodes to exact silence: small models trained from
    # scratch on CPU budgets otherwise collapse to a bias-driven output that ignores the input (docs/architecture.md).
    # Off also initialises the stage convs variance-preserving (see Autoencoder), so the latent carries the input
    # from step 0 instead of ~45 dB under it.
    conv_bias: bool = True

    def __post_init__(self) -> None:
        # JSON gives lists; tuples keep the config hashable and comparable.
        for name in ("strides", "encoder_multipliers", "decoder_multipliers"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("audio_channels", "sample_rate", "latent_channels", "encoder_channels", "decoder_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"autoencoder.{name}: must be a positive integer, got {getattr(self, name)!r}")
        if not self.strides:
            raise ValueError("autoencoder.strides: needs at least one stage")
        # Odd strides would make the transposed conv (k = 2s, padding ceil(s/2)) produce T·s - 1 samples.
        if any(s < 2 or s % 2 for s in self.strides):
            raise ValueError(f"autoencoder.strides: every stride must be even and >= 2, got {self.strides}")
        for name in ("encoder_multipliers", "decoder_multipliers"):
            mults = getattr(self, name)
            if len(mults) != len(self.strides):
                raise ValueError(f"autoencoder.{name}: needs one entry per stride ({len(self.strides)}), got {mults}")
            if any(m < 1 for m in mults):
                raise ValueError(f"autoencoder.{name}: multipliers must be >= 1, got {mults}")
        for name in ("encoder_out_kernel", "decoder_in_kernel"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ValueError(
                    f"autoencoder.{name}: must be odd and >= 1 (length-preserving), got {getattr(self, name)}"
                )

    @property
    def downsampling(self) -> int:
        """Audio samples per latent frame, D = prod(strides)."""
        return math.prod(self.strides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoencoderConfig:
        """Build from a dict such as ``to_dict()``'s; keys starting with ``_`` (markers) are ignored, unknown keys
        raise ``ValueError`` naming the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if not k.startswith("_")}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"autoencoder.{unknown[0]}: unknown config key (known: {', '.join(sorted(known))})")
        return cls(**fields)


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # CPU tests and the demo: sa1's framing and latent (D = 1024, 64 channels) at toy widths (4 doubling to 64;
    # ~206k parameters), without conv biases (see AutoencoderConfig.conv_bias: with them, it collapses to an
    # input-independent output). 64 channels, not fewer: the best linear code of 16 numbers per 1024-sample stereo
    # frame scores a spectral convergence of 0.73 on the demo's held-out music, of 64 numbers 0.48.
    "tiny": AutoencoderConfig(
        latent_channels=64,
        strides=(4, 4, 8, 8),
        encoder_channels=4,
        encoder_multipliers=(2, 4, 8, 16),
        decoder_channels=4,
        decoder_multipliers=(2, 4, 8, 16),
        conv_bias=False,
    ),
    # The paper's VAE: DAC encoder (128 doubling, strides 4,4,8,8) with the SA1 1x1 projection to 128 = 2·64
    # channels, DAC decoder (1536 halving, rates 8,8,4,4) with a biased output conv and tanh.
    "sa1": AutoencoderConfig(
        latent_channels=64,
        strides=(4, 4, 8, 8),
        encoder_channels=128,
        encoder_multipliers=(2, 4, 8, 16),
        encoder_projection=True,
        decoder_channels=96,
        decoder_multipliers=(2, 4, 8, 16),
        decoder_out_bias=True,
        final_tanh=True,
    ),
    # Stable Audio Open's Oobleck VAE (D = 2048); the defaults are this model.
    "sa-open": AutoencoderConfig(),
}
AUTOENCODER_PRESETS["tiny-open"] = AUTOENCODER_PRESETS["tiny"]  # a preset name builds every component


# --------------------------------------------------------------------------------------------------- networks
class Encoder(nn.Module):
    """(B, audio_channels, N) → (B, 2·latent_channels, N / D); N must be a multiple of D."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        wn, bias = cfg.weight_norm, cfg.conv_bias
        widths = [cfg.encoder_channels] + [cfg.encoder_channels * m for m in cfg.encoder_multipliers]
        self.conv_in = conv1d(cfg.audio_channels, widths[0], AUDIO_KERNEL, bias=bias, weight_norm=wn)
        self.blocks = nn.ModuleList(
            EncoderBlock(widths[i], widths[i + 1], s, bias=bias, weight_norm=wn) for i, s in enumerate(cfg.strides)
        )
        self.act_out = SnakeBeta(widths[-1])
        moments = 2 * cfg.latent_channels
        self.conv_out = conv1d(
            widths[-1],
            widths[-1] if cfg.encoder_projection else moments,
            cfg.encoder_out_kernel,
            bias=bias,
            weight_norm=wn,
        )
        # SA1 (DAC wrapper) ends on a plain, not weight-normalised, 1x1 projection to the moments.
        self.proj_out = nn.Conv1d(widths[-1], moments, 1, bias=bias) if cfg.encoder_projection else nn.Identity()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(audio)  # (B, W0, N)
        for block in self.blocks:
            x = block(x)  # (B, W_i+1, N / prod(strides[:i+1]))
        return self.proj_out(self.conv_out(self.act_out(x)))  # (B, 2C, T)


class Decoder(nn.Module):
    """(B, latent_channels, T) → (B, audio_channels, T · D)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        wn, bias = cfg.weight_norm, cfg.conv_bias
        widths = [cfg.decoder_channels] + [cfg.decoder_channels * m for m in cfg.decoder_multipliers]
        self.conv_in = conv1d(cfg.latent_channels, widths[-1], cfg.decoder_in_kernel, bias=bias, weight_norm=wn)
        # Walk from the widest (latent end) stage down to the audio end, up-sampling by the reversed strides.
        stages = list(enumerate(cfg.strides))[::-1]
        self.blocks = nn.ModuleList(
            DecoderBlock(widths[i + 1], widths[i], s, bias=bias, weight_norm=wn) for i, s in stages
        )
        self.act_out = SnakeBeta(widths[0])
        self.conv_out = conv1d(widths[0], cfg.audio_channels, AUDIO_KERNEL, bias=cfg.decoder_out_bias, weight_norm=wn)
        self.final_tanh = cfg.final_tanh

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(latents)  # (B, W_last, T)
        for block in self.blocks:
            x = block(x)
        x = self.conv_out(self.act_out(x))  # (B, audio_channels, T · D)
        return torch.tanh(x) if self.final_tanh else x


def _scale_weight(conv: nn.Module, factor: float, out_channels: slice) -> None:
    """Multiply a conv's effective weight for ``out_channels`` by ``factor``: its weight-norm gain g if it is
    weight-normalised (w = g · v / ||v||), else the weight itself."""
    if parametrize.is_parametrized(conv, "weight"):
        conv.parametrizations.weight.original0[out_channels] *= factor
    else:
        conv.weight[out_channels] *= factor


# ------------------------------------------------------------------------------------------------- bottleneck
def vae_bottleneck(
    moments: torch.Tensor, *, sample: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the encoder output into a diagonal Gaussian and return (latents, kl).

    moments (B, 2C, T) → mean, scale (B, C, T); std = softplus(scale) + 1e-4 (softplus keeps it positive, the
    floor keeps log var finite). latents = mean + std · eps when ``sample`` else mean.
    kl = KL(N(mean, var) || N(0, 1)) summed over channels and averaged over batch and frames, i.e.
    mean_{b,t} Σ_c (mean² + var − log var − 1) — without the usual ½, as in stable-audio-tools and diffusers, so
    the training recipe's KL weight (1e-4 in the paper's codebase) keeps its meaning. Shape ().
    """
    mean, scale = moments.chunk(2, dim=1)
    std = F.softplus(scale) + 1e-4
    var = std * std
    kl = (mean * mean + var - torch.log(var) - 1).sum(dim=1).mean()
    if not sample:
        return mean, kl
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps, kl


# ---------------------------------------------------------------------------------------------------- model
class Autoencoder(nn.Module):
    """Encoder + VAE bottleneck + decoder. Audio is float32 (B, audio_channels, N) at ``sample_rate`` Hz.

    Framing (D = downsampling, here D = 4 for the picture)::

        audio   |a a a a|a a a a|a a 0 0|     N = 10 samples, right-padded with zeros to N' = 12 = 3·D
        latents |   z0  |   z1  |   z2  |     T = ceil(N / D) = 3 frames; frame t summarises samples [t·D, (t+1)·D)
        decoded |y y y y|y y y y|y y y y|     T·D = 12 samples; callers trim to the N they want
    """

    def __init__(self, cfg: AutoencoderConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else AutoencoderConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        if not self.cfg.conv_bias:
            _variance_preserving_stages(self)

    # ------------------------------------------------------------------ properties
    @property
    def downsampling(self) -> int:
        """Audio samples per latent frame."""
        return self.cfg.downsampling

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    @property
    def sample_rate(self) -> int:
        """Audio sample rate in Hz (44100 for every preset)."""
        return self.cfg.sample_rate

    @property
    def latent_rate(self) -> float:
        """Latent frames per second of audio."""
        return self.cfg.sample_rate / self.cfg.downsampling

    # ------------------------------------------------------------------ encode / decode
    def _check_audio(self, audio: torch.Tensor) -> None:
        if audio.ndim != 3 or audio.shape[1] != self.cfg.audio_channels:
            raise ValueError(
                f"audio must be (B, {self.cfg.audio_channels}, N) at {self.sample_rate} Hz, got {tuple(audio.shape)}"
            )

    def _pad(self, audio: torch.Tensor) -> torch.Tensor:
        """Right-pad (B, C, N) with zeros to a multiple of D (see the class docstring)."""
        self._check_audio(audio)
        return F.pad(audio, (0, (-audio.shape[-1]) % self.downsampling))

    def moments(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, audio_channels, N) → the encoder's raw output (B, 2C, ceil(N / D)): mean and scale, stacked."""
        return self.encoder(self._pad(audio))

    def encode(
        self, audio: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, audio_channels, N) float32 → latents (B, C, ceil(N / D)): the posterior mean, or a draw if ``sample``."""
        return vae_bottleneck(self.moments(audio), sample=sample, generator=generator)[0]

    def encode_with_kl(
        self, audio: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For training: (latents (B, C, T), kl ()) with kl as in :func:`vae_bottleneck`."""
        return vae_bottleneck(self.moments(audio), sample=sample, generator=generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T) → audio (B, audio_channels, T · D) float32."""
        if latents.ndim != 3 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, T), got {tuple(latents.shape)}")
        return self.decoder(latents)

    def forward(
        self, audio: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: latents (a posterior draw, or its mean if not ``sample``) → reconstruction trimmed to N,
        (B, audio_channels, N), and kl ()."""
        latents, kl = self.encode_with_kl(audio, sample=sample, generator=generator)
        return self.decode(latents)[..., : audio.shape[-1]], kl

    @torch.no_grad()
    def fold_latent_scale(self, scale: float) -> None:
        """Rescale the latent space by 1 / ``scale`` in the weights: the posterior mean becomes mean / scale and the
        decoder reads latents · scale, so ``decode(encode(x))`` is unchanged (up to float rounding) while every
        latent is ``scale`` times smaller. Stable Diffusion's scale factor and stable-audio-tools' pretransform
        ``scale`` do this at every call; folded, the export needs no extra field.

        The mean half of the layer that emits the moments (weights and bias; its weight-norm gain where it has one)
        is divided by ``scale``, the decoder's first conv multiplied (it is linear in its input; a bias there is
        kept). The scale half is left alone: a draw (``encode(sample=True)``) keeps its old noise level, now
        relatively smaller by ``scale``; every longplay stage downstream of training uses the mean."""
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"latent scale must be a positive finite number, got {scale}")
        last = self.encoder.proj_out if self.cfg.encoder_projection else self.encoder.conv_out
        c = self.latent_channels
        _scale_weight(last, 1.0 / scale, out_channels=slice(0, c))
        if last.bias is not None:
            last.bias[:c] /= scale
        _scale_weight(self.decoder.conv_in, scale, out_channels=slice(None))

    # ------------------------------------------------------------------ long audio
    @torch.no_grad()
    def encode_chunked(
        self,
        audio: torch.Tensor,
        chunk_seconds: float = 30.0,
        overlap_seconds: float | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Like :meth:`encode` for arbitrarily long audio, in windows of ``chunk_seconds`` (bounded memory).

        Each window is read with ``overlap_seconds`` of context on both sides; the context frames, which see
        the window's zero padding instead of real neighbours, are dropped and only the core is kept::

            audio     |=========================================|
            window 0  |core 0------|ctx|
            window 1           |ctx|core 1------|ctx|
            window 2                        |ctx|core 2-----|     (the last core may be shorter)
            kept      |core 0------|core 1------|core 2-----|

        Windows start on multiples of D, so frames line up with a full pass. The default context is what the
        encoder's receptive field reaches on each side (:func:`encoder_context_latents` in blocks: 8 frames for
        every preset), which makes the result equal to :meth:`encode` up to float rounding. A window is never
        shorter than 2·context + 1 frames.
        Returns (B, C, ceil(N / D)).
        """
        audio = self._pad(audio)
        d = self.downsampling
        context = self._frames(overlap_seconds, encoder_context_latents(self.cfg.strides, self.cfg.encoder_out_kernel))
        chunk = max(round(chunk_seconds * self.latent_rate), 2 * context + 1)
        parts = []
        with parametrize.cached():  # weight-norm weights computed once, not once per window
            for read_start, read_end, core_start, core_end in chunk_windows(audio.shape[-1] // d, chunk, context):
                moments = self.encoder(audio[..., read_start * d : read_end * d])
                parts.append(moments[..., core_start - read_start : core_end - read_start])
        return vae_bottleneck(torch.cat(parts, dim=-1), sample=sample, generator=generator)[0]

    @torch.no_grad()
    def decode_chunked(
        self, latents: torch.Tensor, chunk_seconds: float = 30.0, overlap_seconds: float | None = None
    ) -> torch.Tensor:
        """Like :meth:`decode` for long latents, in windows of ``chunk_seconds`` with ``overlap_seconds`` of
        discarded context on each side (default: :func:`decoder_context_latents`). Returns (B, audio_channels, T·D)."""
        d = self.downsampling
        context = self._frames(overlap_seconds, decoder_context_latents(self.cfg.strides, self.cfg.decoder_in_kernel))
        chunk = max(round(chunk_seconds * self.latent_rate), 2 * context + 1)
        parts = []
        with parametrize.cached():
            for read_start, read_end, core_start, core_end in chunk_windows(latents.shape[-1], chunk, context):
                audio = self.decode(latents[..., read_start:read_end])
                parts.append(audio[..., (core_start - read_start) * d : (core_end - read_start) * d])
        return torch.cat(parts, dim=-1)

    def _frames(self, seconds: float | None, default: int) -> int:
        return default if seconds is None else math.ceil(seconds * self.latent_rate)


@torch.no_grad()
def _variance_preserving_stages(model: nn.Module) -> None:
    """Scale the initial weights of every conv outside the residual branches (input/output, down/up-sampling) by √3.

    PyTorch's default conv init has Var(w) = 1 / (3 · fan_in), so each such conv divides the signal's variance by 3:
    through the encoder's six of them, a random tiny VAE's latent sits ~45 dB under its input and far under the
    posterior noise, and learning starts by digging it out. √3 makes them variance-preserving (Var(w) = 1 / fan_in);
    the residual branches keep the small default so each block starts near the identity.
    """
    branches = {id(m) for unit in model.modules() if isinstance(unit, ResidualUnit) for m in unit.modules()}
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.ConvTranspose1d) and id(module) not in branches:
            weight_norm = getattr(module, "parametrizations", None)
            (weight_norm.weight.original0 if weight_norm is not None else module.weight).mul_(math.sqrt(3.0))


def build_autoencoder(preset: str, device: str | torch.device = "cpu") -> Autoencoder:
    """A freshly initialised autoencoder of a named preset (``tiny``, ``sa1``, ``sa-open``) on ``device``
    (``"meta"`` builds it without allocating memory, for parameter counts)."""
    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(
            f"model.preset: unknown autoencoder preset {preset!r} (known: {', '.join(AUTOENCODER_PRESETS)})"
        )
    cfg = dataclasses.replace(AUTOENCODER_PRESETS[preset])  # a copy, so callers can't mutate the preset
    with torch.device(device):
        return Autoencoder(cfg)
