"""Typed configuration for every stage, loaded from YAML with ``key=value`` dotted overrides.

One loader for everything: :func:`load_config` reads a YAML file (or nothing), applies overrides such as
``run.max_steps=20`` and validates the result against a pydantic schema that forbids unknown keys. Any
problem raises :class:`ConfigError`, whose message is one line naming the key; the CLI turns it into exit 2.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.diffusion import SAMPLERS
from pipeline.models.presets import PRESETS

# The names come from their registries (the sampler functions, the model preset tables); Literal keeps them in the
# schema, so a wrong name fails when the config loads with the choices listed.
PresetName = Literal[PRESETS]  # type: ignore[valid-type]
SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is a single line naming the key and what is wrong."""


class Section(BaseModel):
    """Base for every config block: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------------------------- shared blocks
class RunConfig(Section):
    # The name becomes a folder under checkpoint_uri: no leading dot or dash ('.', '..', hidden, option-like).
    name: str = Field("run", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", description="run name; same name resumes")
    checkpoint_uri: str = Field(".longplay/checkpoints", description="local dir or s3:// prefix for checkpoints")
    experiment: str = Field("longplay", description="MLflow experiment name")
    max_steps: int = Field(1000, ge=1, description="optimizer steps to train for")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    log_every: int = Field(10, ge=1, description="steps between metric logs")
    demo_every: int = Field(1000, ge=1, description="steps between demo audio/spectrogram logs")
    seed: int = Field(0, description="base seed; each rank and worker derives its own from it")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train may recover from")
    register_as: str | None = Field(None, description="MLflow registered model name (default: run name)")


class ScalingSection(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one DeepSpeed rank each)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK onto few nodes, or SPREAD over nodes"
    )


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO optimisation stage")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="training precision (fp16 needs scaling.use_gpu)"
    )
    micro_batch: int = Field(4, ge=1, description="samples per rank per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip (0 = off)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-3, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    decay: Literal["cosine", "constant", "inverse"] = Field("cosine", description="lr schedule after warmup")

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, betas: tuple[float, float]) -> tuple[float, float]:
        # torch.optim.AdamW raises on them only when the engine is built, inside a Ray worker, as a traceback.
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class EmaSection(Section):
    enabled: bool = Field(True, description="keep an exponential moving average of the weights")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per optimizer step")


class DataSection(Section):
    shards: str = Field(..., description="a preprocess OUT (local dir or s3:// prefix)")
    split: str = Field("train", description="shard split to read")
    window_seconds: float = Field(10.0, gt=0, description="training crop length in seconds")
    shuffle_buffer: int = Field(256, ge=0, description="samples in the seeded shuffle buffer")
    num_loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    holdout_split: str | None = Field(None, description="held-out split scored at every checkpoint (off if unset)")
    holdout_shards: str | None = Field(
        None, description="preprocess OUT that holds holdout_split (default: data.shards itself)"
    )
    holdout_samples: int = Field(64, ge=1, description="held-out samples scored at each checkpoint (the first N)")
    timing_crops: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="share of training crops cut to 1..window-1 whole seconds and padded with silence, as a file "
        "of that length (diffusion: teaches where to stop when the data has few short files)",
    )
    caption_field_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="chance that each comma-separated field of a training caption is left out (the rest shuffled, "
        "one always kept), as Stable Audio prompts from a random subset of the metadata",
    )


class LoraSection(Section):
    """LoRA adapters on the diffusion backbone (peft): with ``rank`` > 0 only the adapters train."""

    rank: int = Field(0, ge=0, description="adapter rank; 0 = off (full fine-tuning or training from scratch)")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha (updates are scaled by alpha / rank); default: rank"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out"],
        min_length=1,
        description="backbone Linear layers that get adapters (names as in the model: attention projections)",
    )
    merge: bool = Field(False, description="export the merged weights (a plain bundle) instead of the adapters")


class ModelSection(Section):
    preset: PresetName = Field("tiny", description="model size preset")
    vae: str | None = Field(None, description="autoencoder URI (diffusion demo decode / VAE resume)")
    clap: str | None = Field(None, description="trained CLAP URI (diffusion conditioning)")
    text_encoder: Literal["clap", "t5"] = Field(
        "clap", description="diffusion: what conditions the model on text: our CLAP or a frozen T5 (Stable Audio Open)"
    )
    t5: str | None = Field(None, description="T5 encoder + tokenizer directory or URI (text_encoder: t5)")
    init_from: str | None = Field(
        None, description="diffusion: a bundle (export URI) whose weights the run starts from (fine-tuning)"
    )
    lora: LoraSection = LoraSection()
    activation_checkpointing: bool = Field(
        False, description="diffusion: recompute each U-Net / DiT block's activations in backward (less memory)"
    )
    compile: bool = Field(False, description="diffusion: torch.compile the backbone (faster GPU steps after a compile)")


class VaeLossSection(Section):
    """The autoencoder's training objective (train vae only)."""

    adversarial: bool = Field(
        True, description="add the STFT discriminator's hinge + feature-matching terms (the paper's recipe)"
    )
    kl_weight: float = Field(1e-4, ge=0, description="weight of the posterior's KL term")
    magnitude_floor: float = Field(
        1e-4, gt=0, description="STFT magnitudes are floored here before the log (auraloss/stable-audio-tools: 1e-4)"
    )
    waveform_weight: float = Field(
        0.0, ge=0, description="weight of the waveform term ||x̂ - x||² / ||x||² (0: the paper's recipe)"
    )
    sample_posterior: bool = Field(
        True, description="decode a draw from the posterior while training (the paper); false decodes its mean"
    )
    unit_latents: bool = Field(
        False,
        description="fold a scale into the exported VAE so its latents have unit RMS on the held-out audio "
        "(else on training crops)",
    )


# ----------------------------------------------------------------------------------------------- stage configs
class TrainConfig(Section):
    """Everything a training run needs; ``kind`` picks the loop."""

    kind: Literal["vae", "clap", "diffusion"] = Field(..., description="which model this run trains")
    data: DataSection
    run: RunConfig = RunConfig()
    scaling: ScalingSection = ScalingSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    ema: EmaSection = EmaSection()
    model: ModelSection = ModelSection()
    cfg_dropout: float = Field(
        0.1, ge=0, le=1, description="diffusion: prob. of dropping text+timing per sample (classifier-free guidance)"
    )
    demo_prompts: list[str] = Field(default_factory=lambda: ["solo piano in C major"], description="demo prompts")
    demo_seconds: list[float] = Field(default_factory=lambda: [4.0, 8.0], description="demo lengths (s)")
    holdout_seconds: list[float] = Field(
        default_factory=lambda: [2.0, 4.0, 6.0, 8.0],
        description="diffusion: lengths requested for the held-out captions (cycled) when timing is scored",
    )
    sample_cfg_scale: float = Field(
        6.0, ge=0, allow_inf_nan=False, description="diffusion: CFG scale of the demo and held-out generations"
    )
    vae: VaeLossSection = VaeLossSection()

    # Rules across sections: checked when the config loads, so `longplay train`, the demo and a Ray worker all see
    # them. The message starts with the key (see _first_error_line).
    @model_validator(mode="after")
    def _diffusion_needs_a_text_encoder(self) -> TrainConfig:
        # A fine-tune takes the text encoder of the bundle it starts from unless the config names one.
        if self.kind != "diffusion" or self.model.init_from:
            return self
        if self.model.text_encoder == "clap" and not self.model.clap:
            raise ValueError("model.clap: diffusion needs a trained CLAP (path, s3:// URI or models:/NAME@ALIAS)")
        if self.model.text_encoder == "t5" and not self.model.t5:
            raise ValueError("model.t5: text_encoder t5 needs the T5 encoder's directory or URI")
        return self

    @model_validator(mode="after")
    def _lora_needs_a_base(self) -> TrainConfig:
        if self.model.lora.rank and (self.kind != "diffusion" or not self.model.init_from):
            raise ValueError("model.lora.rank: LoRA trains adapters on a diffusion bundle; set model.init_from")
        if self.model.lora.rank and self.deepspeed.zero_stage == 3:
            raise ValueError("deepspeed.zero_stage: LoRA runs under ZeRO 0-2 (the adapters are small; use 2)")
        return self

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> TrainConfig:
        if self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("deepspeed.precision: fp16 needs scaling.use_gpu=true (use fp32 or bf16 on CPU)")
        return self


class AugmentSection(Section):
    copies: int = Field(0, ge=0, description="augmented variants added per input")
    chain: list[dict[str, Any]] = Field(default_factory=list, description="audiomentations transforms with args")
    seed: int = Field(0, description="augmentation seed; reruns produce the same variants")


class PreprocessConfig(Section):
    max_seconds: float = Field(95.0, gt=0, description="segment length; longer files are split")
    samples_per_shard: int = Field(256, ge=1, description="target samples per tar shard")
    split: str = Field("train", pattern=r"^[a-z0-9]+$", description="split name in shard file names")
    batch_size: int = Field(4, ge=1, description="segments per VAE batch")
    num_encoders: int = Field(1, ge=1, description="VAE actors in the Ray pool")
    cpus_per_encoder: float = Field(0.5, gt=0, description="CPUs per VAE actor (fractional on CPU)")
    use_gpu: bool = Field(False, description="one GPU per VAE actor")
    scheduling: Literal["SPREAD", "DEFAULT"] = Field(
        "SPREAD", description="Ray placement of the VAE actors: SPREAD over nodes, or Ray's DEFAULT (packs)"
    )
    chunk_seconds: float = Field(30.0, gt=0, description="chunked VAE encode window for long segments")
    max_input_seconds: float = Field(
        7200.0, gt=0, description="longer inputs are refused (errors.jsonl, too-long:), checked before decoding them"
    )
    augment: AugmentSection = AugmentSection()


C = TypeVar("C", bound=BaseModel)


class EmbedderSection(Section):
    """Local weights of the paper's embedders; unset (or not loadable here) means the documented fallback."""

    openl3_weights: str | None = Field(None, description="openl3_audio_mel256_music.h5 (FD_openl3)")
    passt_weights: str | None = Field(None, description="PaSST-S AudioSet state dict (KL_passt)")
    laion_clap_checkpoint: str | None = Field(None, description="630k-audioset-fusion-best.pt (CLAP score)")


class EvaluateConfig(Section):
    """`longplay evaluate`: how to generate, which embedders, where the MLflow run goes."""

    steps: int = Field(50, ge=1, description="sampler steps")
    cfg_scale: float = Field(6.0, ge=0, allow_inf_nan=False, description="classifier-free guidance scale")
    sampler: SamplerName = Field("dpmpp-3m-sde", description="sampler")
    seed: int = Field(0, ge=0, le=2**64 - 1, description="sampling seed (the same for every prompt)")
    seconds: float = Field(10.0, gt=0, allow_inf_nan=False, description="length for prompts that do not give their own")
    kl_direction: Literal["reference||generated", "generated||reference"] = Field(
        "reference||generated", description="KL(p||q) order; stable-audio-metrics' code uses generated||reference"
    )
    experiment: str = Field("longplay", description="MLflow experiment of the evaluation run")
    run_name: str = Field("evaluate", description="MLflow run name")
    embedders: EmbedderSection = EmbedderSection()


# ----------------------------------------------------------------------------------------------- loading
def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["run.max_steps=5", "data.shards=s3://b/x"]`` → nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{item or '<empty>'}: override must look like section.key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another override")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``patch`` merged in recursively (``patch`` wins)."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _first_error_line(err: ValidationError) -> str:
    first = err.errors()[0]
    more = len(err.errors()) - 1
    suffix = f" (and {more} more)" if more else ""
    if not first["loc"] and first["type"] == "value_error":
        return f"{first['ctx']['error']}{suffix}"  # a rule across sections: its message starts with the key
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    return f"{key}: {msg}{suffix}"


def load_config(schema: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Load ``path`` (YAML) into ``schema`` with dotted overrides; raise :class:`ConfigError` on any problem."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    raw = deep_merge(raw, parse_overrides(overrides))
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_first_error_line(err)) from None


def config_hash(cfg: BaseModel) -> str:
    """Stable short hash of a resolved config (sorted JSON), for tags and cache keys."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(cfg: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"name": "x"}}`` → ``{"run.name": "x"}``: the form MLflow params take."""
    tree = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
