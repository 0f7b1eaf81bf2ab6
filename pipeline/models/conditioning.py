"""Timing conditioning and the conditioned diffusion model (backbone + timing conditioners + CFG dropout).

Stable Audio conditions on text tokens (CLAP's penultimate text layer, 768-d) and two timing values in seconds:
``seconds_start`` (offset of the training crop in its file) and ``seconds_total`` (length of the file). Each timing
value becomes one 768-d token appended to the text tokens for cross-attention:

    cross-attention tokens = [text_1 .. text_L, start, total]   (B, L + 2, D)

Stable Audio 1.0 (U-Net) learns one embedding per integer second 0..512 ("embedding"); Stable Audio Open (DiT) uses
learned Fourier features of seconds / 512 and a linear layer ("fourier") and also feeds [start ‖ total] (B, 2D) to
the DiT's global token ("timing_global").

Classifier-free guidance: with probability ``cfg_dropout`` per sample, all cross-attention tokens are replaced by the
null conditioning (zeros, or SA 1.0's learned null sequence) and the mask by all-valid; the global timing vector is
kept, as in stable-audio-tools. ``forward(..., uncond=True)`` gives the same null branch for sampling.

Timing frames (``timing_frame_rate`` > 0; the ``tiny`` preset only, not in the paper): the same two values also
become one per-frame input channel, 1 on the latent frames inside the requested audio, [0, seconds_total −
seconds_start) seconds of the window, and 0 after, concatenated to the noisy latents (the DiT's ``input_concat``).
The paper's models learn where to stop from the timing tokens alone; the 2-block DiT trained for CPU minutes did
not (every 8 s window non-silent to its end whatever was asked, also with absolute positions or only short
training crops), because reading "frame i is past the end" out of a global token is a comparison the tiny network
never learned. The channel states it per frame; CFG keeps it in both branches, like the global timing vector.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.diffusion import cfg_batched_model_fn, cfg_model_fn
from pipeline.models.dit import DIT_PRESETS, DiT, DiTConfig
from pipeline.models.unet import UNET_PRESETS, LearnedTimeFeatures, UNet1d, UNetConfig


class TimingConditioner(nn.Module):
    """Seconds (B,) float → one conditioning token (B, 1, dim).

    kind "embedding" (SA 1.0): a learned vector per integer second, seconds clamped to [0, max_seconds] and floored.
    kind "fourier" (SA Open): learned Fourier features of seconds / max_seconds (clamped to [0, 1]) and a linear map.
    """

    def __init__(self, kind: str, dim: int, max_seconds: int = 512, fourier_features: int = 256) -> None:
        super().__init__()
        if kind not in ("embedding", "fourier"):
            raise ValueError(f"timing kind must be 'embedding' or 'fourier', got {kind!r}")
        self.kind, self.max_seconds = kind, max_seconds
        if kind == "embedding":
            self.embedding = nn.Embedding(max_seconds + 1, dim)
        else:
            self.features = LearnedTimeFeatures(fourier_features)
            self.proj = nn.Linear(fourier_features + 1, dim)

    def forward(self, seconds: torch.Tensor) -> torch.Tensor:
        seconds = seconds.float().clamp(0, self.max_seconds)  # (B,)
        if self.kind == "embedding":
            return self.embedding(seconds.floor().long())[:, None, :]
        return self.proj(self.features(seconds / self.max_seconds))[:, None, :]


@dataclass
class DiffusionModelConfig:
    backbone: str = "dit"  # "unet" (Stable Audio 1.0) or "dit" (Stable Audio Open)
    unet: UNetConfig | None = None  # backbone config when backbone == "unet"
    dit: DiTConfig | None = None  # backbone config when backbone == "dit"
    io_channels: int = 64  # latent channels (the VAE's)
    cond_token_dim: int = 768  # width of text and timing tokens (CLAP text width)
    timing: str = "fourier"  # timing conditioner: "embedding" (SA 1.0) or "fourier" (SA Open)
    timing_max_seconds: int = 512  # timing values are clamped to [0, this]
    timing_global: bool = True  # also pass [start ‖ total] (B, 2 cond_token_dim) as the backbone's global cond
    max_text_tokens: int = 77  # longest text token sequence (CLAP's context)
    null_cond: str = "zeros"  # null tokens for CFG: "zeros" or "learned" (SA 1.0's learned null sequence)
    timing_frame_rate: float = 0.0  # latent frames/s; > 0 adds the per-frame "inside the requested length" channel

    def __post_init__(self) -> None:
        if self.backbone not in ("unet", "dit"):
            raise ValueError(f"diffusion.backbone must be 'unet' or 'dit', got {self.backbone!r}")
        if self.timing not in ("embedding", "fourier"):
            raise ValueError(f"diffusion.timing must be 'embedding' or 'fourier', got {self.timing!r}")
        if self.null_cond not in ("zeros", "learned"):
            raise ValueError(f"diffusion.null_cond must be 'zeros' or 'learned', got {self.null_cond!r}")
        global_dim = 2 * self.cond_token_dim if self.timing_global else 0
        if self.backbone == "unet":
            if self.unet is None:
                raise ValueError("diffusion.unet is required when backbone == 'unet'")
            got = (self.unet.in_channels, self.unet.context_dim, self.unet.global_cond_dim)
        else:
            if self.dit is None:
                raise ValueError("diffusion.dit is required when backbone == 'dit'")
            got = (self.dit.io_channels, self.dit.cond_token_dim, self.dit.global_cond_dim)
        if self.timing_frame_rate < 0 or (self.timing_frame_rate > 0 and self.backbone != "dit"):
            raise ValueError("diffusion.timing_frame_rate: must be 0, or > 0 with the dit backbone")
        concat = 1 if self.timing_frame_rate > 0 else 0
        if self.backbone == "dit" and self.dit.input_concat_dim != concat:  # type: ignore[union-attr]
            raise ValueError(
                f"diffusion.dit.input_concat_dim must be {concat} with timing_frame_rate {self.timing_frame_rate}"
            )
        if got != (self.io_channels, self.cond_token_dim, global_dim):
            raise ValueError(
                f"diffusion.{self.backbone}: (channels, token dim, global dim) = {got}, expected "
                f"{(self.io_channels, self.cond_token_dim, global_dim)} from io_channels, cond_token_dim, timing_global"
            )


DIFFUSION_PRESETS: dict[str, DiffusionModelConfig] = {
    # Stable Audio 1.0: U-Net, per-second timing embeddings as cross-attention tokens only
    "sa1": DiffusionModelConfig(
        backbone="unet", unet=UNET_PRESETS["sa1"], timing="embedding", timing_global=False, null_cond="learned"
    ),
    # Stable Audio Open: DiT, Fourier timing tokens, timing also as global conditioning
    "sa-open": DiffusionModelConfig(
        backbone="dit", dit=DIT_PRESETS["sa-open"], timing="fourier", timing_global=True, max_text_tokens=128
    ),  # T5-base tokens, padded to 128 (model.text_encoder: t5)
    # CPU tests and the demo: a 2-block DiT over 64-ch latents, 64-d tiny-CLAP text tokens (up to 77)
    "tiny": DiffusionModelConfig(
        backbone="dit",
        dit=dataclasses.replace(DIT_PRESETS["tiny"], input_concat_dim=1),
        io_channels=64,
        cond_token_dim=64,
        timing="fourier",
        timing_global=True,
        max_text_tokens=77,  # the tiny CLAP's context, as sa1's
        timing_frame_rate=44100 / 1024,  # the tiny VAE's latent rate; see "Timing frames" above
    ),
    # Stable Audio Open's conditioning at the tiny size (CPU tests of T5 conditioning, checkpoint import and
    # fine-tuning): the tiny DiT without the timing-frame channel, 64-d T5 tokens padded to 128 and not masked in
    # cross-attention, like sa-open; 64 wide (4 heads of 16), as the small diffusers / stable-audio-tools models
    # its import tests build (tiny's 128 is for learning timing on the demo; it never learns here)
    "tiny-open": DiffusionModelConfig(
        backbone="dit",
        dit=dataclasses.replace(DIT_PRESETS["tiny"], embed_dim=64, use_cross_attn_mask=False),
        io_channels=64,
        cond_token_dim=64,
        max_text_tokens=128,
    ),
    # the sa1 architecture (U-Net, per-second timing embeddings, learned null sequence) at the tiny size: CPU tests
    # and `benchmarks/gpu.py --preset tiny`
    "tiny-unet": DiffusionModelConfig(
        backbone="unet",
        unet=UNET_PRESETS["tiny"],
        io_channels=64,
        cond_token_dim=64,
        timing="embedding",
        timing_global=False,
        null_cond="learned",
        max_text_tokens=77,
    ),
}


class ConditionedDiffusionModel(nn.Module):
    """A v-predicting backbone with its timing conditioners; text tokens come from outside (CLAP)."""

    def __init__(self, cfg: DiffusionModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone: nn.Module = UNet1d(cfg.unet) if cfg.backbone == "unet" else DiT(cfg.dit)  # type: ignore[arg-type]
        self.seconds_start = TimingConditioner(cfg.timing, cfg.cond_token_dim, cfg.timing_max_seconds)
        self.seconds_total = TimingConditioner(cfg.timing, cfg.cond_token_dim, cfg.timing_max_seconds)
        self.null_tokens = (
            nn.Parameter(torch.randn(cfg.max_text_tokens + 2, cfg.cond_token_dim) / math.sqrt(cfg.cond_token_dim))
            if cfg.null_cond == "learned"
            else None
        )

    def conditioning(
        self,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        seconds_start: torch.Tensor,
        seconds_total: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Cross-attention tokens (B, L+2, D), their mask (B, L+2) bool, global cond (B, 2D) or None."""
        B, L, _ = text_tokens.shape
        if L > self.cfg.max_text_tokens:
            raise ValueError(f"got {L} text tokens, the model takes at most {self.cfg.max_text_tokens}")
        start, total = self.seconds_start(seconds_start), self.seconds_total(seconds_total)  # (B, 1, D) each
        tokens = torch.cat([text_tokens.to(start.dtype), start, total], dim=1)  # (B, L+2, D)
        mask = torch.cat([text_mask.bool(), text_mask.new_ones(B, 2, dtype=torch.bool)], dim=1)  # (B, L+2)
        global_cond = torch.cat([start[:, 0], total[:, 0]], dim=-1) if self.cfg.timing_global else None
        return tokens, mask, global_cond

    def timing_frames(
        self, seconds_start: torch.Tensor, seconds_total: torch.Tensor, frames: int
    ) -> torch.Tensor | None:
        """(B, 1, frames): 1 where frame i starts inside [0, seconds_total - seconds_start) s, else 0; None when off."""
        if self.cfg.timing_frame_rate <= 0:
            return None
        length = (seconds_total.float() - seconds_start.float()).clamp(min=0) * self.cfg.timing_frame_rate  # (B,)
        index = torch.arange(frames, device=length.device, dtype=length.dtype)
        return (index[None, :] < length[:, None] - 1e-4).float()[:, None, :]

    def null_conditioning(self, tokens: torch.Tensor) -> torch.Tensor:
        """The null token sequence for CFG, shaped like tokens (B, L+2, D)."""
        if self.null_tokens is None:
            return torch.zeros_like(tokens)
        return self.null_tokens[: tokens.shape[1]].to(tokens.dtype).expand_as(tokens)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        seconds_start: torch.Tensor,
        seconds_total: torch.Tensor,
        cfg_dropout: float = 0.0,
        uncond: bool | torch.Tensor = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predict v for noisy latents.

        Args:
            x: x_t (B, C, T). t: diffusion time in [0, 1] (B,).
            text_tokens: (B, L, D) text features; text_mask: (B, L) bool, True = real token.
            seconds_start, seconds_total: (B,) float seconds.
            cfg_dropout: probability, per sample, of replacing the cross-attention tokens by the null ones (training).
            uncond: use the null tokens for every sample (the unconditional branch of CFG), or for the samples a
                (B,) bool tensor marks (both branches of CFG in one batch).
            generator: RNG for the dropout draw.
        Returns:
            v (B, C, T).
        """
        tokens, mask, global_cond = self.conditioning(text_tokens, text_mask, seconds_start, seconds_total)
        B = tokens.shape[0]
        if isinstance(uncond, torch.Tensor):
            drop = uncond.to(tokens.device)
        elif uncond:
            drop = torch.ones(B, dtype=torch.bool, device=tokens.device)
        elif cfg_dropout > 0.0:
            rng_device = generator.device if generator is not None else tokens.device
            drop = (torch.rand(B, generator=generator, device=rng_device) < cfg_dropout).to(tokens.device)
        else:
            drop = None
        if drop is not None:
            tokens = torch.where(drop[:, None, None], self.null_conditioning(tokens), tokens)
            mask = mask | drop[:, None]  # the null sequence is attended to in full
        frames = self.timing_frames(seconds_start, seconds_total, x.shape[-1])
        if frames is None:
            return self.backbone(x, t, tokens, mask, global_cond)
        return self.backbone(x, t, tokens, mask, global_cond, input_concat=frames.to(x.device))


def guided_model_fn(
    model: ConditionedDiffusionModel,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    seconds_start: torch.Tensor,
    seconds_total: torch.Tensor,
    cfg_scale: float = 1.0,
    batched: bool = True,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Bind conditioning (and CFG at ``cfg_scale``) into a ``model_fn(x_t, t) -> v`` for ``pipeline.diffusion``.

    CFG runs the conditional and unconditional branches as one forward of the batch [cond; uncond] (``batched``),
    or, with ``batched=False``, as two calls (the reference the batched form is tested against)."""

    def branch(uncond: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t, text_tokens, text_mask, seconds_start, seconds_total, uncond=uncond)

        return fn

    if cfg_scale == 1.0 or not batched:
        return cfg_model_fn(branch(False), branch(True), cfg_scale)
    B = text_tokens.shape[0]
    tokens, mask = torch.cat([text_tokens, text_tokens]), torch.cat([text_mask, text_mask])  # (2B, L, D), (2B, L)
    start, total = torch.cat([seconds_start, seconds_start]), torch.cat([seconds_total, seconds_total])  # (2B,)
    null = torch.arange(2 * B, device=text_tokens.device) >= B  # the second half is the unconditional branch

    def paired(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, tokens, mask, start, total, uncond=null)

    return cfg_batched_model_fn(paired, cfg_scale)


def build_diffusion_model(
    preset: str, activation_checkpointing: bool = False, compile_backbone: bool = False
) -> ConditionedDiffusionModel:
    """A freshly initialised model for a preset name ("tiny", "sa1", "sa-open").

    ``activation_checkpointing`` recomputes every backbone block's activations in backward (training memory);
    ``compile_backbone`` compiles the backbone with ``torch.compile`` in place (parameter names unchanged)."""
    if preset not in DIFFUSION_PRESETS:
        raise ValueError(f"unknown diffusion preset {preset!r}; choose from {sorted(DIFFUSION_PRESETS)}")
    cfg = copy.deepcopy(DIFFUSION_PRESETS[preset])
    backbone_cfg = cfg.unet if cfg.backbone == "unet" else cfg.dit
    backbone_cfg.activation_checkpointing = activation_checkpointing  # type: ignore[union-attr]
    model = ConditionedDiffusionModel(cfg)
    if compile_backbone:
        model.backbone.compile()
    return model
