"""Autoencoder weights: our export, stable-audio-tools and diffusers layouts → :class:`Autoencoder`.

Key layouts of the same network (n stages; encoder stage i, residual unit j in 0..2):

    ours                         stable-audio-tools (Oobleck)       diffusers (AutoencoderOobleck)
    encoder.conv_in              encoder.layers.0                   encoder.conv1
    encoder.blocks.i.units.j.*   encoder.layers.{i+1}.layers.j.*    encoder.block.i.res_unit{j+1}.*
      .act1 .conv1 .act2 .conv2    .layers.0 .1 .2 .3                 .snake1 .conv1 .snake2 .conv2
    encoder.blocks.i.act, .down  encoder.layers.{i+1}.layers.3, .4  encoder.block.i.snake1, .conv1
    encoder.act_out, .conv_out   encoder.layers.{n+1}, .{n+2}       encoder.snake1, .conv2
    decoder.blocks.i.act, .up    decoder.layers.{i+1}.layers.0, .1  decoder.block.i.snake1, .conv_t1
    decoder.blocks.i.units.j.*   decoder.layers.{i+1}.layers.{j+2}  decoder.block.i.res_unit{j+1}.*

Weight norm: both references store ``weight_g`` / ``weight_v``; they become our parametrization's ``original0`` /
``original1`` unchanged, or are folded into a plain ``weight = g · v / ‖v‖`` when the target config has
``weight_norm=False`` (and a plain weight is split into g, v the other way). Snake parameters are reshaped
((1, C, 1) in diffusers, (C,) in ours and stable-audio-tools). Everything is strict: a key that isn't mapped, or a
weight the model lacks, is an error naming it.

The architecture is read from the weights' shapes (``infer_config``); what shapes can't tell (``final_tanh``,
``sample_rate``) comes from a config file when there is one, else Stable Audio Open's values (no tanh, 44.1 kHz).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from pipeline.models.autoencoder import Autoencoder, AutoencoderConfig
from pipeline.weights.formats import detect_format, load_state_dict_file, read_safetensors_metadata

CLASS_NAME = "longplay.Autoencoder"  # config.json marker of our export
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_G, _V = ".parametrizations.weight.original0", ".parametrizations.weight.original1"


def _normalise_weight_norm_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``x.weight_g`` / ``x.weight_v`` (torch.nn.utils.weight_norm) → our parametrization names."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".weight_g"):
            key = key[: -len(".weight_g")] + _G
        elif key.endswith(".weight_v"):
            key = key[: -len(".weight_v")] + _V
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------- diffusers
_DIFFUSERS_RULES = [
    (r"(encoder|decoder)\.block\.(\d+)\.res_unit([123])\.(snake|conv)([12])\.(.+)", None),  # handled in code
    (r"encoder\.block\.(\d+)\.snake1\.(.+)", r"encoder.blocks.\1.act.\2"),
    (r"encoder\.block\.(\d+)\.conv1\.(.+)", r"encoder.blocks.\1.down.\2"),
    (r"decoder\.block\.(\d+)\.snake1\.(.+)", r"decoder.blocks.\1.act.\2"),
    (r"decoder\.block\.(\d+)\.conv_t1\.(.+)", r"decoder.blocks.\1.up.\2"),
    (r"(encoder|decoder)\.conv1\.(.+)", r"\1.conv_in.\2"),
    (r"(encoder|decoder)\.snake1\.(.+)", r"\1.act_out.\2"),
    (r"(encoder|decoder)\.conv2\.(.+)", r"\1.conv_out.\2"),
]


def autoencoder_state_dict_from_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``AutoencoderOobleck.state_dict()`` → our key layout (tensors unchanged; see :func:`fit_state_dict`)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _DIFFUSERS_RULES:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            if replacement is None:
                part, block, unit, kind, idx, rest = m.groups()
                name = {"snake": "act", "conv": "conv"}[kind] + idx
                out[f"{part}.blocks.{block}.units.{int(unit) - 1}.{name}.{rest}"] = value
            else:
                out[m.expand(replacement)] = value
            break
        else:
            raise KeyError(f"unexpected key in the diffusers AutoencoderOobleck state dict: {key}")
    return _normalise_weight_norm_keys(out)


# -------------------------------------------------------------------------------------- stable-audio-tools
_SAT_UNIT = ("act1", "conv1", "act2", "conv2")  # ResidualUnit.layers: Snake, conv k7, Snake, conv k1


def stable_audio_tools_prefix(state_dict: dict[str, torch.Tensor]) -> str:
    """Where the autoencoder sits in a stable-audio-tools checkpoint: the shortest non-EMA prefix before
    ``encoder.layers.0.`` (``pretransform.model.`` in a diffusion checkpoint, ``autoencoder.`` in an
    autoencoder run, ``""`` bare). Raises KeyError if there is none."""
    prefixes = {k.split("encoder.layers.0.")[0] for k in state_dict if "encoder.layers.0." in k}
    prefixes = {p for p in prefixes if p == "" or p.endswith(".")}
    if not prefixes:
        raise KeyError("no stable-audio-tools Oobleck autoencoder (encoder.layers.0.*) in this checkpoint")
    return min(prefixes, key=lambda p: ("ema" in p, len(p), p))


def _sat_key(key: str, n: int) -> str:
    """One stable-audio-tools key (prefix stripped) → ours; ``n`` is the number of encoder/decoder stages."""
    part, _, rest = key.partition(".")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    if part not in ("encoder", "decoder") or m is None:
        raise KeyError(key)
    layer, tail = int(m[1]), m[2]
    if layer == 0:
        return f"{part}.conv_in.{tail}"
    if layer == n + 1:
        return f"{part}.act_out.{tail}"
    if layer == n + 2:
        return f"{part}.conv_out.{tail}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", tail)
    if m is None or layer > n:
        raise KeyError(key)
    block, sub, tail = f"{part}.blocks.{layer - 1}", int(m[1]), m[2]
    unit = sub if part == "encoder" else sub - 2  # encoder: units 0-2 then act, down; decoder: act, up, units
    if 0 <= unit < 3:
        m = re.fullmatch(r"layers\.([0-3])\.(.+)", tail)
        if m is None:
            raise KeyError(key)
        return f"{block}.units.{unit}.{_SAT_UNIT[int(m[1])]}.{m[2]}"
    names = {"encoder": {3: "act", 4: "down"}, "decoder": {0: "act", 1: "up"}}[part]
    if sub not in names:
        raise KeyError(key)
    return f"{block}.{names[sub]}.{tail}"


def autoencoder_state_dict_from_stable_audio_tools(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stable-audio-tools checkpoint (whole, or just the ``AudioAutoencoder``) → our key layout. Keys outside
    the autoencoder (DiT, conditioners, discriminators, EMA copies) are ignored."""
    prefix = stable_audio_tools_prefix(state_dict)
    ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    ours = {k: v for k, v in ours.items() if k.startswith(("encoder.", "decoder."))}
    stages = {int(m[1]) for k in ours if (m := re.match(r"encoder\.layers\.(\d+)\.layers\.", k))}
    n = len(stages)
    out = {}
    for key, value in ours.items():
        try:
            out[_sat_key(key, n)] = value
        except KeyError:
            raise KeyError(f"unexpected key in the stable-audio-tools autoencoder: {prefix}{key}") from None
    return _normalise_weight_norm_keys(out)


# ------------------------------------------------------------------------------------------- config + fitting
def _weight(state_dict: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    for key in (name + _V, name + ".weight"):
        if key in state_dict:
            return state_dict[key]
    raise KeyError(f"missing weight {name}.weight (or its weight-norm {name}{_V})")


def infer_config(state_dict: dict[str, torch.Tensor], **overrides: object) -> AutoencoderConfig:
    """Read the architecture off the tensor shapes of a state dict in our layout. ``overrides`` set the fields
    shapes can't tell (``final_tanh``, ``sample_rate``, ``weight_norm``)."""
    conv_in = _weight(state_dict, "encoder.conv_in")  # (W0, audio_channels, 7)
    n = len({m[1] for k in state_dict if (m := re.match(r"encoder\.blocks\.(\d+)\.down\.", k))})
    downs = [_weight(state_dict, f"encoder.blocks.{i}.down") for i in range(n)]  # (W_i+1, W_i, 2s)
    ups = [_weight(state_dict, f"decoder.blocks.{i}.up") for i in range(n)]  # (W_in, W_out, 2s), latent end first
    dec_in, dec_out = _weight(state_dict, "decoder.conv_in"), _weight(state_dict, "decoder.conv_out")
    enc_out = _weight(state_dict, "encoder.conv_out")
    projection = "encoder.proj_out.weight" in state_dict
    moments = state_dict["encoder.proj_out.weight"].shape[0] if projection else enc_out.shape[0]

    strides = tuple(w.shape[-1] // 2 for w in downs)
    if tuple(w.shape[-1] // 2 for w in reversed(ups)) != strides:
        raise ValueError("autoencoder weights: decoder up-sampling strides are not the encoder's, reversed")

    def multipliers(widths: list[int], base: int, where: str) -> tuple[int, ...]:
        if any(w % base for w in widths):
            raise ValueError(f"autoencoder weights: {where} widths {widths} are not multiples of {base}")
        return tuple(w // base for w in widths)

    fields: dict[str, object] = dict(
        audio_channels=conv_in.shape[1],
        latent_channels=dec_in.shape[1],
        strides=strides,
        encoder_channels=conv_in.shape[0],
        encoder_multipliers=multipliers([w.shape[0] for w in downs], conv_in.shape[0], "encoder"),
        encoder_out_kernel=enc_out.shape[-1],
        encoder_projection=projection,
        decoder_channels=dec_out.shape[1],
        decoder_multipliers=multipliers([w.shape[0] for w in reversed(ups)], dec_out.shape[1], "decoder"),
        decoder_in_kernel=dec_in.shape[-1],
        decoder_out_bias="decoder.conv_out.bias" in state_dict,
        weight_norm=any(_V in k for k in state_dict),
    )
    if moments != 2 * fields["latent_channels"]:
        raise ValueError(f"autoencoder weights: encoder emits {moments} channels, decoder takes {dec_in.shape[1]}")
    fields.update(overrides)
    return AutoencoderConfig(**fields)


def fit_state_dict(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a state dict in our key layout to ``model``: fold or split weight norm as the model needs, reshape
    Snake parameters, cast to the model's dtype. Raises ValueError naming missing or unexpected keys."""
    target = model.state_dict()
    out, used, missing = {}, set(), []
    for key, ref in target.items():
        if key in state_dict:
            value = state_dict[key]
            used.add(key)
        elif key.endswith((_G, _V)) and key[: -len(_G)] + ".weight" in state_dict:  # split a plain weight
            plain_key = key[: -len(_G)] + ".weight"
            plain = state_dict[plain_key]
            used.add(plain_key)
            value = plain if key.endswith(_V) else plain.norm(dim=tuple(range(1, plain.ndim)), keepdim=True)
        elif key.endswith(".weight") and key[: -len(".weight")] + _V in state_dict:  # fold g · v / ‖v‖
            base = key[: -len(".weight")]
            g, v = state_dict[base + _G], state_dict[base + _V]
            used.update((base + _G, base + _V))
            value = g * v / v.norm(dim=tuple(range(1, v.ndim)), keepdim=True)
        else:
            missing.append(key)
            continue
        if value.shape != ref.shape:
            if key.endswith((".alpha", ".beta")) and value.numel() == ref.numel():
                value = value.reshape(ref.shape)
            else:
                raise ValueError(
                    f"autoencoder weights: {key} has shape {tuple(value.shape)}, model wants {tuple(ref.shape)}"
                )
        out[key] = value.to(dtype=ref.dtype)
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected:
        raise ValueError(f"autoencoder weights don't fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return out


# ------------------------------------------------------------------------------------------- load / save
def _read_config_json(path: Path) -> dict[str, object]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_ours(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """State dict (``autoencoder.`` prefix stripped) and config dict of our export (directory or one file)."""
    file = src / WEIGHTS_FILE if src.is_dir() else src
    config = _read_config_json(file.parent / CONFIG_FILE)
    metadata = read_safetensors_metadata(file)
    if "autoencoder_config" in metadata:
        config = json.loads(metadata["autoencoder_config"])
    state_dict = load_state_dict_file(file)
    if any(k.startswith("autoencoder.") for k in state_dict):
        state_dict = {k[len("autoencoder.") :]: v for k, v in state_dict.items() if k.startswith("autoencoder.")}
    return state_dict, config


def read_autoencoder(src: str | os.PathLike, config: AutoencoderConfig | None = None) -> Autoencoder:
    """An :class:`Autoencoder` (CPU, float32, eval mode) from a local path in any supported format: our export (a
    directory with model.safetensors + config.json, or one .safetensors file), a stable-audio-tools checkpoint
    (.ckpt/.safetensors) or a diffusers ``AutoencoderOobleck`` folder. ``config`` overrides what can't be read from
    the weights (e.g. ``final_tanh`` for a bare stable-audio-tools checkpoint). Any URI: ``pipeline.components``."""
    src = Path(src)
    source_format = detect_format(src)
    extra: dict[str, object] = {}
    if source_format == "longplay":
        state_dict, config_dict = _read_ours(src)
        if config is None and config_dict:
            config = AutoencoderConfig.from_dict(config_dict)
    elif source_format == "diffusers":
        folder = src if src.is_dir() else src.parent
        files = sorted(folder.glob("*.safetensors")) if src.is_dir() else [src]
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors weights")
        raw: dict[str, torch.Tensor] = {}
        for file in files:
            raw.update(load_state_dict_file(file))
        state_dict = autoencoder_state_dict_from_diffusers(raw)
        diffusers_config = _read_config_json(folder / CONFIG_FILE)
        extra = {"sample_rate": int(diffusers_config.get("sampling_rate", 44100))}
    else:
        state_dict = autoencoder_state_dict_from_stable_audio_tools(load_state_dict_file(src))
        sat_config = _read_config_json(src.parent / "model_config.json")
        extra = _sat_overrides(sat_config)
    if config is None:
        config = infer_config(state_dict, **extra)
    model = Autoencoder(config)
    model.load_state_dict(fit_state_dict(state_dict, model), strict=True)
    return model.eval()


def _sat_overrides(model_config: dict[str, object]) -> dict[str, object]:
    """What a stable-audio-tools ``model_config.json`` says that shapes can't: sample rate, final tanh."""
    out: dict[str, object] = {}
    if "sample_rate" in model_config:
        out["sample_rate"] = int(model_config["sample_rate"])  # type: ignore[arg-type]
    model = model_config.get("model", {})
    vae = model.get("pretransform", {}).get("config", model) if isinstance(model, dict) else {}
    decoder = vae.get("decoder") if isinstance(vae, dict) else None
    if isinstance(decoder, dict):  # stable-audio-tools' OobleckDecoder defaults to final_tanh=True
        out["final_tanh"] = bool(decoder.get("config", {}).get("final_tanh", True))
    return out


def save_autoencoder(model: Autoencoder, directory: str | os.PathLike) -> Path:
    """Write our export: ``model.safetensors`` (the state dict) + ``config.json`` (``_class_name`` + config)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "longplay"})
    config = {"_class_name": CLASS_NAME, **model.cfg.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory
