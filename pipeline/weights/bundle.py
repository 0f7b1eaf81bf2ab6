"""Import a whole Stable Audio Open model (DiT, timing conditioners, VAE, and where its T5 is) as a longplay bundle.

Two sources, one destination::

                 stable-audio-tools checkpoint          diffusers StableAudioPipeline folder
                 (model.safetensors | .ckpt)            (model_index.json)
    DiT          model.model.*                          transformer/
    timing       conditioner.conditioners.seconds_*     projection_model/
    VAE          pretransform.model.*                   vae/
    T5           (named only: t5-base)                  text_encoder/ + tokenizer/
    config       model_config.json, beside the file     each part's config.json

    bundle (DST)  model.safetensors   our ConditionedDiffusionModel: backbone.*, seconds_start.*, seconds_total.*
                  autoencoder/        our VAE export
                  config.json         {"kind": "diffusion", "preset", "latent_rate", "window_seconds",
                                       "text_encoder": "t5", "t5": URI, "source": {"format", "path"}, ...}

The architecture is read from the source's config (``model_config.json``, or the pipeline's per-component
``config.json``) and must equal the preset the bundle names, field by field: ``load_bundle`` rebuilds the model from
the preset alone, so any difference would load (or silently compute) something else. The first difference is a
:class:`~pipeline.config.ConfigError` naming its key (``dit.depth: the checkpoint has 2, preset sa-open has 24``).

T5 is not copied: the bundle's config names it (``"t5": URI``, read by :class:`pipeline.t5.T5Conditioner`). A
diffusers folder holds it (``text_encoder/`` + ``tokenizer/``), so the folder itself is the URI; a stable-audio-tools
checkpoint only names it (``t5_model_name``: ``t5-base``), so ``--t5`` must give a local copy. Either is loaded once
here, to fail now rather than at the first ``generate``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.conditioning import DIFFUSION_PRESETS, DiffusionModelConfig, build_diffusion_model
from pipeline.models.dit import DiTConfig
from pipeline.weights.autoencoder import CONFIG_FILE, WEIGHTS_FILE, read_autoencoder, save_autoencoder
from pipeline.weights.dit import (
    diffusion_state_dict_from_stable_audio_tools,
    dit_config_from_diffusers,
    dit_config_from_stable_audio_tools,
    dit_state_dict_from_diffusers,
    timing_state_dict_from_diffusers,
)
from pipeline.weights.formats import detect_format, load_state_dict_file, read_json

SAT_CONFIG_FILE = "model_config.json"  # stable-audio-tools keeps the model's config beside the checkpoint
TIMING_IDS = ["seconds_start", "seconds_total"]  # our ConditionedDiffusionModel's two timing tokens, in this order
T5_MAX_LENGTH = 128  # stable-audio-tools' T5Conditioner default max_length (Open's)
DIFFUSERS_SAMPLE_SIZE = 1024  # StableAudioDiTModel's default sample_size (latent frames of Open's 47.55 s window)
RUNTIME_FIELDS = {"activation_checkpointing"}  # how a model is run, not what it computes: never compared


@dataclasses.dataclass
class Source:
    """What the source says about the model, before any weights are read."""

    format: str  # "stable-audio-tools" or "diffusers"
    path: Path  # the checkpoint file or the pipeline folder
    config: DiffusionModelConfig  # the architecture, in our terms
    window: float  # the training window: latent frames (diffusers' sample_size) or audio samples (stable-audio-tools')
    window_unit: str  # "frames" or "samples"
    t5_default: str | None  # the T5 URI when the source holds one (a diffusers folder), else None

    def window_seconds(self, vae: Autoencoder) -> float:
        """The training window in seconds, given the source's VAE (its sample and latent rates)."""
        return self.window / (vae.latent_rate if self.window_unit == "frames" else vae.sample_rate)


# ------------------------------------------------------------------------------------------- reading the source
def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _whole_seconds(value: object, key: str) -> int:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a number of seconds") from None
    if not seconds.is_integer():
        raise ConfigError(f"{key}: {value} is not a whole number of seconds (our timing conditioners clamp to one)")
    return int(seconds)


def _model_config(where: Path, dit: DiTConfig, **fields: Any) -> DiffusionModelConfig:
    """Our config for the source's DiT + Open's conditioning (Fourier timing tokens, zero null tokens)."""
    try:
        return DiffusionModelConfig(backbone="dit", dit=dit, timing="fourier", null_cond="zeros", **fields)
    except ValueError as err:
        raise ConfigError(f"{where}: {_one_line(err)}") from None


def _need(mapping: object, key: str, where: str, file: Path) -> Any:
    """``mapping[key]`` of a stable-audio-tools config, or a ConfigError naming ``where + key`` and the file."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise ConfigError(f"{file}: {where}{key} is missing")
    return mapping[key]


def _stable_audio_tools_conditioning(model: dict[str, Any], file: Path) -> dict[str, Any]:
    """The conditioning fields of our config from ``model.conditioning`` and ``model.diffusion``: Open's is a T5
    prompt then seconds_start, seconds_total as cross-attention tokens, the two timings also as global conditioning."""
    diffusion, conditioning = _need(model, "diffusion", "model.", file), _need(model, "conditioning", "model.", file)
    conditioners = {c.get("id"): c for c in _need(conditioning, "configs", "model.conditioning.", file)}
    cross_ids, global_ids = diffusion.get("cross_attention_cond_ids", []), diffusion.get("global_cond_ids", [])
    text = conditioners.get(cross_ids[0] if cross_ids else None, {})
    if cross_ids[1:] != TIMING_IDS or text.get("type") != "t5":
        raise ConfigError(
            f"{file}: model.diffusion.cross_attention_cond_ids is {cross_ids}; supported: [a t5 conditioner, "
            f"{', '.join(TIMING_IDS)}] (Stable Audio Open's)"
        )
    if global_ids not in (TIMING_IDS, []):
        raise ConfigError(f"{file}: model.diffusion.global_cond_ids is {global_ids}; supported: {TIMING_IDS} or []")
    # stable-audio-tools' NumberConditioner: seconds clamped to [min_val, max_val] (defaults 0, 1), then normalised
    ranges = [conditioners[name].get("config", {}) for name in TIMING_IDS]
    for name, limits in zip(TIMING_IDS, ranges, strict=True):
        if conditioners[name].get("type") != "number" or limits.get("min_val", 0) != 0:
            raise ConfigError(
                f"{file}: conditioner {name} is a {conditioners[name].get('type')!r} with min_val "
                f"{limits.get('min_val', 0)}; supported: a number conditioner with min_val 0 (ours divide seconds by "
                "the max)"
            )
    max_seconds = [limits.get("max_val", 1) for limits in ranges]
    if max_seconds[0] != max_seconds[1]:
        raise ConfigError(f"{file}: seconds_start and seconds_total have max_val {max_seconds}; ours share one")
    return dict(
        cond_token_dim=int(_need(conditioning, "cond_dim", "model.conditioning.", file)),
        timing_max_seconds=_whole_seconds(max_seconds[0], f"{file}: seconds_total.max_val"),
        timing_global=bool(global_ids),
        max_text_tokens=int(text.get("config", {}).get("max_length", T5_MAX_LENGTH)),
    )


def read_stable_audio_tools(src: Path) -> Source:
    """A stable-audio-tools ``diffusion_cond`` checkpoint and its ``model_config.json`` → :class:`Source`."""
    file = src.parent / SAT_CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{src}: no {SAT_CONFIG_FILE} beside it (stable-audio-tools keeps the model's config there)")
    try:
        raw = read_json(file)
    except ValueError as err:
        raise ConfigError(_one_line(err)) from None
    if raw.get("model_type") != "diffusion_cond":
        raise ConfigError(f"{file}: model_type is {raw.get('model_type')!r}, not diffusion_cond (text-to-audio)")
    model = _need(raw, "model", "", file)
    diffusion = _need(model, "diffusion", "model.", file)
    if diffusion.get("type") != "dit" or diffusion.get("diffusion_objective", "v") != "v":
        raise ConfigError(
            f"{file}: model.diffusion is a {diffusion.get('type')!r} with objective "
            f"{diffusion.get('diffusion_objective', 'v')!r}; only a v-objective dit is supported"
        )
    pretransform = _need(model, "pretransform", "model.", file)
    if pretransform.get("type") != "autoencoder" or pretransform.get("scale", 1.0) != 1.0:
        raise ConfigError(
            f"{file}: model.pretransform is a {pretransform.get('type')!r} with scale {pretransform.get('scale', 1.0)}"
            "; supported: an autoencoder with scale 1"
        )
    try:
        dit = dit_config_from_stable_audio_tools(raw)
    except ValueError as err:
        raise ConfigError(f"{file}: model.diffusion.config: {_one_line(err)}") from None
    io_channels = int(_need(model, "io_channels", "model.", file))
    config = _model_config(file, dit, io_channels=io_channels, **_stable_audio_tools_conditioning(model, file))
    window = float(_need(raw, "sample_size", "", file))  # audio samples
    return Source("stable-audio-tools", src, config, window, "samples", None)


def read_diffusers(src: Path) -> Source:
    """A diffusers ``StableAudioPipeline`` folder → :class:`Source` (the folder is also the T5's URI)."""
    configs = {}
    for part in ("transformer", "projection_model"):
        file = src / part / CONFIG_FILE
        if not file.is_file():
            raise ConfigError(f"{src}: no {part}/{CONFIG_FILE} (a StableAudioPipeline folder has {part}/)")
        try:
            configs[part] = read_json(file)
        except ValueError as err:
            raise ConfigError(_one_line(err)) from None
    projection = configs["projection_model"]
    if projection.get("text_encoder_dim") != projection.get("conditioning_dim"):
        raise ConfigError(
            f"{src}/projection_model: text_encoder_dim {projection.get('text_encoder_dim')} != conditioning_dim "
            f"{projection.get('conditioning_dim')}: a projected T5 (text_projection) has no place in our model"
        )
    if projection.get("min_value", 0) != 0:
        raise ConfigError(
            f"{src}/projection_model: min_value is {projection.get('min_value')}; supported: 0 (ours divide seconds "
            "by the max)"
        )
    try:
        dit = dit_config_from_diffusers(configs["transformer"])
    except ValueError as err:
        raise ConfigError(f"{src}/transformer: {_one_line(err)}") from None
    tokenizer_file = src / "tokenizer" / "tokenizer_config.json"
    tokenizer = read_json(tokenizer_file) if tokenizer_file.is_file() else {}
    config = _model_config(
        src,
        dit,
        io_channels=dit.io_channels,
        cond_token_dim=int(projection["conditioning_dim"]),
        timing_max_seconds=_whole_seconds(projection.get("max_value"), f"{src}/projection_model: max_value"),
        timing_global=True,  # StableAudioDiTModel always has its global_proj: [start ‖ total]
        max_text_tokens=int(tokenizer.get("model_max_length", T5_MAX_LENGTH)),  # what the pipeline pads to
    )
    window = float(configs["transformer"].get("sample_size", DIFFUSERS_SAMPLE_SIZE))  # latent frames
    return Source("diffusers", src, config, window, "frames", str(src.resolve()))


def read_source(src: str | os.PathLike) -> Source:
    """The source at ``src`` (a stable-audio-tools checkpoint file or a StableAudioPipeline folder)."""
    src = Path(src)
    if src.is_dir():
        if not (src / "model_index.json").is_file():
            raise ConfigError(f"{src}: not a StableAudioPipeline folder (no model_index.json)")
        return read_diffusers(src)
    try:
        source_format = detect_format(src)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(_one_line(err)) from None
    if source_format != "stable-audio-tools":
        raise ConfigError(f"{src}: a {source_format} file; a bundle imports a stable-audio-tools checkpoint or folder")
    return read_stable_audio_tools(src)


# ------------------------------------------------------------------------------------------- the checks
def first_difference(ours: Any, preset: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first field (``dit.depth``) where two configs differ, with both values; None when they are equal.

    Dataclasses are compared field by field, in declaration order, recursively; :data:`RUNTIME_FIELDS` are skipped."""
    if dataclasses.is_dataclass(ours) and type(ours) is type(preset):
        for field in dataclasses.fields(ours):
            if field.name not in RUNTIME_FIELDS:
                name = f"{key}.{field.name}" if key else field.name
                found = first_difference(getattr(ours, field.name), getattr(preset, field.name), name)
                if found:
                    return found
        return None
    return None if ours == preset else (key, ours, preset)


def check_preset(config: DiffusionModelConfig, preset: str) -> None:
    """Raise a ConfigError naming the first field where the checkpoint's architecture and the preset differ."""
    if preset not in DIFFUSION_PRESETS:
        raise ConfigError(f"--preset: unknown diffusion preset {preset!r} (choose from {sorted(DIFFUSION_PRESETS)})")
    found = first_difference(config, DIFFUSION_PRESETS[preset])
    if found:
        key, have, want = found
        raise ConfigError(f"{key}: the checkpoint has {have!r}, preset {preset} has {want!r}")


def check_t5(uri: str, config: DiffusionModelConfig, given: bool) -> None:
    """Load the T5 at ``uri`` once (never from the Hugging Face hub) and check its width against the token width."""
    from pipeline.t5 import T5Conditioner

    try:
        t5 = T5Conditioner.load(uri, max_tokens=config.max_text_tokens)
    except (OSError, ValueError) as err:  # FileNotFoundError included
        hint = "" if given else "; give --t5"
        raise ConfigError(f"--t5: {_one_line(err)}{hint}") from None
    if t5.dim != config.cond_token_dim:
        raise ConfigError(
            f"--t5: {uri} gives {t5.dim}-d text tokens, the checkpoint's cond_token_dim is {config.cond_token_dim}"
        )


# ------------------------------------------------------------------------------------------- the weights
def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:  # sharded checkpoints come as several
        tensors.update(load_state_dict_file(file))
    return tensors


def diffusion_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """The source's DiT and timing conditioners as our ConditionedDiffusionModel state dict."""
    try:
        if source.format == "diffusers":
            backbone = dit_state_dict_from_diffusers(_folder_tensors(source.path / "transformer"))
            timing = timing_state_dict_from_diffusers(_folder_tensors(source.path / "projection_model"))
            return {f"backbone.{k}": v for k, v in backbone.items()} | timing
        checkpoint = load_state_dict_file(source.path)
        projected = sorted(k for k in checkpoint if k.startswith("conditioner.") and ".proj_out." in k)
        if projected:  # a T5 narrower/wider than cond_dim, projected: our model has no such layer
            raise ConfigError(f"{source.path}: {projected[0]}: a projected text conditioner is not supported")
        if not any(k.startswith("model.model.") for k in checkpoint):
            raise ConfigError(f"{source.path}: no diffusion model in it (no model.model.* tensors)")
        return diffusion_state_dict_from_stable_audio_tools(checkpoint)
    except ConfigError:
        raise
    except (KeyError, ValueError) as err:  # the mappings name the key they do not know
        raise ConfigError(f"{source.path}: {_one_line(err.args[0] if err.args else err)}") from None


def load_strictly(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], preset: str, where: Path) -> None:
    """Every tensor of the model from ``state_dict`` and nothing else; an error names the first key that isn't."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shapes: the config said one thing, the weights another
        raise ConfigError(f"{where}: the weights do not fit preset {preset}: {_one_line(err)[:300]}") from None
    if missing or unexpected:
        first = f"missing {sorted(missing)[0]}" if missing else f"unexpected {sorted(unexpected)[0]}"
        raise ConfigError(
            f"{where}: the weights do not fit preset {preset}: {first} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )


def read_vae(source: Source) -> Autoencoder:
    """The source's VAE (the pretransform inside a stable-audio-tools checkpoint; ``vae/`` of a diffusers folder)."""
    path = source.path / "vae" if source.format == "diffusers" else source.path
    try:
        vae = read_autoencoder(path)
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{path}: {_one_line(err.args[0] if err.args else err)}") from None
    if vae.latent_channels != source.config.io_channels:
        raise ConfigError(
            f"{path}: the VAE has {vae.latent_channels} latent channels, the DiT takes {source.config.io_channels}"
        )
    return vae


# ------------------------------------------------------------------------------------------- the bundle
def _t5_uri(t5: str | None, source: Source) -> str:
    """The URI the bundle names for its T5: ``t5`` (a local path made absolute), else the source's own."""
    if t5 is None:
        if source.t5_default is None:
            raise ConfigError(
                f"--t5: a stable-audio-tools checkpoint does not hold its T5 encoder (its {SAT_CONFIG_FILE} names "
                "t5-base); give the folder of t5-base with its tokenizer"
            )
        return source.t5_default
    if t5.startswith(("s3://", "models:/", "runs:/")):
        return t5
    if not Path(t5).exists():
        raise ConfigError(f"--t5: {t5} does not exist (a folder with a T5 encoder and its tokenizer)")
    return str(Path(t5).resolve())


def _check_destination(dst: str) -> None:
    if storage.is_s3(dst):
        used = next(iter(storage.list_uris(dst)), None) is not None
    elif Path(dst).exists() and not Path(dst).is_dir():
        raise ConfigError(f"--to: {dst} is a file; a bundle is a folder (or end the name in .safetensors)")
    else:
        used = Path(dst).is_dir() and any(Path(dst).iterdir())
    if used:
        raise ConfigError(f"--to: {dst} is not empty; give a new folder")


def write_bundle(dst: str, model: torch.nn.Module, vae: Autoencoder, config: dict[str, Any]) -> None:
    """Write model.safetensors, autoencoder/ and config.json into a folder beside ``dst`` (a temp folder for s3://),
    then move it into place whole: a rename locally; an upload to s3://, config.json last, so a reader that finds it
    finds the rest."""
    from safetensors.torch import save_file

    parent = None if storage.is_s3(dst) else Path(dst).resolve().parent
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".longplay-import-", dir=parent) as tmp:
        staged = Path(tmp) / "bundle"
        staged.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(staged / WEIGHTS_FILE), metadata={"format": "longplay"})
        save_autoencoder(vae, staged / "autoencoder")
        (staged / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if parent is not None:
            if Path(dst).is_dir():
                Path(dst).rmdir()  # checked empty
            staged.rename(dst)
            return
        files = sorted(p for p in staged.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p == staged / CONFIG_FILE):
            storage.write_file(storage.join(dst, *path.relative_to(staged).parts), path)


def _count(module: torch.nn.Module) -> dict[str, int]:
    return {"tensors": len(module.state_dict()), "parameters": sum(p.numel() for p in module.parameters())}


def import_bundle(
    src: str | os.PathLike, dst: str | os.PathLike, preset: str = "sa-open", t5: str | None = None
) -> dict[str, Any]:
    """Convert a Stable Audio Open model (see the module docstring) into a bundle at ``dst`` that
    :func:`pipeline.components.load_bundle` loads and ``longplay generate`` runs.

    ``dst`` is a new or empty local folder, or an empty s3:// prefix. ``preset`` names the diffusion preset the
    checkpoint must match. ``t5`` is the URI of the T5 encoder folder (with its tokenizer) the bundle will name:
    required for a stable-audio-tools checkpoint, default the pipeline folder itself for diffusers. Every problem
    with the inputs is a one-line :class:`ConfigError`. Returns a summary of what was written.
    """
    dst = str(dst)
    # the cheap checks of every input first; then the preset; then what needs loading (T5, weights)
    source = read_source(src)
    t5_uri = _t5_uri(t5, source)
    _check_destination(dst)
    check_preset(source.config, preset)
    check_t5(t5_uri, source.config, given=t5 is not None)
    model = build_diffusion_model(preset)
    load_strictly(model, diffusion_state_dict(source), preset, source.path)
    vae = read_vae(source)
    config = {
        "kind": "diffusion",
        "preset": preset,
        "latent_rate": vae.latent_rate,
        "latent_channels": vae.latent_channels,
        "window_seconds": source.window_seconds(vae),
        "text_encoder": "t5",
        "t5": t5_uri,
        "source": {"format": source.format, "path": str(source.path.resolve())},
    }
    write_bundle(dst, model, vae, config)
    return {
        "src": str(source.path),
        "dst": dst,
        **{k: config[k] for k in ("preset", "t5", "latent_rate", "window_seconds")},
        "source_format": source.format,
        "components": {"diffusion": _count(model), "autoencoder": {**_count(vae), "config": vae.cfg.to_dict()}},
    }
