"""Import Stable Audio Open DiT weights: diffusers' StableAudioDiTModel, stable-audio-tools' DiffusionTransformer.

Pure key/shape mapping on state dicts (no diffusers or stable-audio-tools import): the caller loads the tensors
(safetensors) and the config JSON and passes plain dicts. Every source key must be either mapped or knowingly
skipped; anything else raises, so an unsupported variant (adaLN, QK-norm, memory tokens, ...) fails loudly.

Layout differences handled here:
- stable-audio-tools fuses q/k/v (self-attention ``to_qkv``) and k/v (cross-attention ``to_kv``); we keep them apart.
- its LayerNorms are ``gamma``/``beta`` (beta a zero buffer); ours are ``weight``/``bias``.
- its timestep Fourier weight is (F, 1); diffusers' and ours is (F,).
- diffusers computes rotary positions in the pipeline over head_dim // 2 channels; stable-audio-tools over
  max(head_dim // 2, 32); both rotate-half, base 10000 (``DiTConfig.rotary_dim``).
- neither published model masks padded text tokens in cross-attention, hence ``use_cross_attn_mask=False``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from pipeline.models.dit import DiTConfig

Tensor = torch.Tensor

# diffusers block-level names → ours
_DIFFUSERS_BLOCK = {
    "norm1.weight": "norm_self.weight",
    "norm1.bias": "norm_self.bias",
    "attn1.to_q.weight": "self_attn.to_q.weight",
    "attn1.to_k.weight": "self_attn.to_k.weight",
    "attn1.to_v.weight": "self_attn.to_v.weight",
    "attn1.to_out.0.weight": "self_attn.to_out.weight",
    "norm2.weight": "norm_cross.weight",
    "norm2.bias": "norm_cross.bias",
    "attn2.to_q.weight": "cross_attn.to_q.weight",
    "attn2.to_k.weight": "cross_attn.to_k.weight",
    "attn2.to_v.weight": "cross_attn.to_v.weight",
    "attn2.to_out.0.weight": "cross_attn.to_out.weight",
    "norm3.weight": "norm_ff.weight",
    "norm3.bias": "norm_ff.bias",
    "ff.net.0.proj.weight": "ff.proj_in.weight",
    "ff.net.0.proj.bias": "ff.proj_in.bias",
    "ff.net.2.weight": "ff.proj_out.weight",
    "ff.net.2.bias": "ff.proj_out.bias",
}

# diffusers top-level names → ours (the rest of the model)
_DIFFUSERS_TOP = {
    "time_proj.weight": "time_features.freqs",
    "timestep_proj.0.weight": "to_timestep_embed.0.weight",
    "timestep_proj.0.bias": "to_timestep_embed.0.bias",
    "timestep_proj.2.weight": "to_timestep_embed.2.weight",
    "timestep_proj.2.bias": "to_timestep_embed.2.bias",
    "global_proj.0.weight": "to_global_embed.0.weight",
    "global_proj.2.weight": "to_global_embed.2.weight",
    "cross_attention_proj.0.weight": "to_cond_embed.0.weight",
    "cross_attention_proj.2.weight": "to_cond_embed.2.weight",
    "preprocess_conv.weight": "preprocess_conv.weight",
    "proj_in.weight": "project_in.weight",
    "proj_out.weight": "project_out.weight",
    "postprocess_conv.weight": "postprocess_conv.weight",
}


def dit_config_from_diffusers(config: dict[str, Any]) -> DiTConfig:
    """A ``StableAudioDiTModel`` config.json (as a dict) → our DiTConfig."""
    if config.get("in_channels", 64) != config.get("out_channels", 64):
        raise ValueError("StableAudioDiTModel with in_channels != out_channels is not supported")
    heads, head_dim = int(config.get("num_attention_heads", 24)), int(config.get("attention_head_dim", 64))
    return DiTConfig(
        io_channels=int(config.get("in_channels", 64)),
        embed_dim=heads * head_dim,
        depth=int(config.get("num_layers", 24)),
        num_heads=heads,
        cond_token_dim=int(config.get("cross_attention_input_dim", 768)),
        cross_attn_dim=int(config.get("cross_attention_dim", 768)),
        cross_attn_kv_heads=int(config.get("num_key_value_attention_heads", 12)),
        global_cond_dim=int(config.get("global_states_input_dim", 1536)),
        timestep_features_dim=int(config.get("time_proj_dim", 256)),
        ff_mult=4,
        rotary_dim=head_dim // 2,  # the diffusers pipeline's get_1d_rotary_pos_embed(head_dim // 2, ...)
        use_cross_attn_mask=False,
    )


def dit_state_dict_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``StableAudioDiTModel.state_dict()`` → our ``DiT`` state dict (same tensors, renamed)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
        if m and m.group(2) in _DIFFUSERS_BLOCK:
            out[f"blocks.{m.group(1)}.{_DIFFUSERS_BLOCK[m.group(2)]}"] = value
        elif key in _DIFFUSERS_TOP:
            out[_DIFFUSERS_TOP[key]] = value
        else:
            raise KeyError(f"unexpected key in the diffusers StableAudioDiTModel state dict: {key}")
    return out


def timing_state_dict_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``StableAudioProjectionModel.state_dict()`` → our ``ConditionedDiffusionModel`` timing conditioner keys."""
    out: dict[str, Tensor] = {}
    names = {"start_number_conditioner": "seconds_start", "end_number_conditioner": "seconds_total"}
    parts = {
        "time_positional_embedding.0.weights": "features.weights",
        "time_positional_embedding.1.weight": "proj.weight",
        "time_positional_embedding.1.bias": "proj.bias",
    }
    for key, value in sd.items():
        src, _, rest = key.partition(".")
        if src in names and rest in parts:
            out[f"{names[src]}.{parts[rest]}"] = value
        elif src == "text_projection":  # only present when T5 width != conditioning width: no place in our model
            raise ValueError("StableAudioProjectionModel with a text_projection layer is not supported")
        else:
            raise KeyError(f"unexpected key in the diffusers StableAudioProjectionModel state dict: {key}")
    return out


# stable-audio-tools -------------------------------------------------------------------------------------------------

_SAT_BLOCK = {
    "pre_norm.gamma": "norm_self.weight",
    "pre_norm.beta": "norm_self.bias",
    "self_attn.to_out.weight": "self_attn.to_out.weight",
    "cross_attend_norm.gamma": "norm_cross.weight",
    "cross_attend_norm.beta": "norm_cross.bias",
    "cross_attn.to_q.weight": "cross_attn.to_q.weight",
    "cross_attn.to_out.weight": "cross_attn.to_out.weight",
    "ff_norm.gamma": "norm_ff.weight",
    "ff_norm.beta": "norm_ff.bias",
    "ff.ff.0.proj.weight": "ff.proj_in.weight",
    "ff.ff.0.proj.bias": "ff.proj_in.bias",
    "ff.ff.2.weight": "ff.proj_out.weight",
    "ff.ff.2.bias": "ff.proj_out.bias",
}

_SAT_TOP = {
    "transformer.project_in.weight": "project_in.weight",
    "transformer.project_out.weight": "project_out.weight",
    "preprocess_conv.weight": "preprocess_conv.weight",
    "postprocess_conv.weight": "postprocess_conv.weight",
}
_SAT_TOP_PREFIXES = ("to_timestep_embed.", "to_cond_embed.", "to_global_embed.")


def _strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keep the keys under ``prefix`` (stripped) if any key has it; else the whole dict."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def dit_config_from_stable_audio_tools(model_config: dict[str, Any]) -> DiTConfig:
    """stable-audio-tools ``model_config.json`` (whole file, or its ``model.diffusion.config``) → DiTConfig."""
    cfg = model_config.get("model", {}).get("diffusion", {}).get("config", model_config)
    unsupported = {
        "patch_size": 1,
        "global_cond_type": "prepend",
        "input_concat_dim": 0,
        "prepend_cond_dim": 0,
        "timestep_cond_type": "global",
        "transformer_type": "continuous_transformer",
    }
    for key, default in unsupported.items():
        if cfg.get(key, default) != default:
            raise ValueError(f"stable-audio-tools DiT option {key}={cfg[key]!r} is not supported (only {default!r})")
    embed, heads = int(cfg.get("embed_dim", 768)), int(cfg.get("num_heads", 8))
    head_dim = embed // heads
    cond_dim = int(cfg.get("cond_token_dim", 0))
    if cond_dim <= 0:
        raise ValueError("stable-audio-tools DiT without cross-attention (cond_token_dim=0) is not supported")
    cross_dim = embed if cfg.get("project_cond_tokens", True) else cond_dim
    global_dim = int(cfg.get("global_cond_dim", 0))
    if global_dim and not cfg.get("project_global_cond", True) and global_dim != embed:
        raise ValueError("stable-audio-tools DiT with project_global_cond=False needs global_cond_dim == embed_dim")
    return DiTConfig(
        io_channels=int(cfg.get("io_channels", 32)),
        embed_dim=embed,
        depth=int(cfg.get("depth", 12)),
        num_heads=heads,
        cond_token_dim=cond_dim,
        cross_attn_dim=cross_dim,
        cross_attn_kv_heads=cross_dim // head_dim,  # ContinuousTransformer: kv heads = context width // head_dim
        global_cond_dim=global_dim,
        timestep_features_dim=256,
        ff_mult=4,
        rotary_dim=max(head_dim // 2, 32),
        use_cross_attn_mask=False,
    )


def dit_state_dict_from_stable_audio_tools(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A stable-audio-tools checkpoint (keys ``model.model.*``) or bare ``DiffusionTransformer`` state dict → ours.

    Conditioner and pretransform keys of a full checkpoint are ignored here (the timing conditioners are
    ``timing_state_dict_from_stable_audio_tools``'s).
    """
    sd = _strip_prefix(sd, "model.model.")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"transformer\.layers\.(\d+)\.(.+)", key)
        if m:
            prefix, rest = f"blocks.{m.group(1)}.", m.group(2)
            if rest in _SAT_BLOCK:
                out[prefix + _SAT_BLOCK[rest]] = value
            elif rest == "self_attn.to_qkv.weight":
                for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.to_{name}.weight"] = part
            elif rest == "cross_attn.to_kv.weight":
                for name, part in zip("kv", value.chunk(2, dim=0), strict=True):
                    out[f"{prefix}cross_attn.to_{name}.weight"] = part
            else:
                raise KeyError(f"unsupported key in the stable-audio-tools DiT state dict: {key}")
        elif key == "timestep_features.weight":
            out["time_features.freqs"] = value.reshape(-1)
        elif key in _SAT_TOP:
            out[_SAT_TOP[key]] = value
        elif key.startswith(_SAT_TOP_PREFIXES):
            out[key] = value
        elif key != "transformer.rotary_pos_emb.inv_freq":  # recomputed from DiTConfig.rotary_dim
            raise KeyError(f"unsupported key in the stable-audio-tools DiT state dict: {key}")
    # LayerNorm betas are zero buffers that some checkpoints lack
    for key in [k for k in out if re.search(r"norm_(self|cross|ff)\.weight$", k)]:
        out.setdefault(key[: -len("weight")] + "bias", torch.zeros_like(out[key]))
    return out


def timing_state_dict_from_stable_audio_tools(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Timing conditioners of a stable-audio-tools checkpoint → our ``ConditionedDiffusionModel`` keys.

    ``number`` conditioners (Open) map to the "fourier" kind, ``int`` conditioners (1.0) to the "embedding" kind.
    """
    out: dict[str, Tensor] = {}
    parts = {
        "embedder.embedding.0.weights": "features.weights",
        "embedder.embedding.1.weight": "proj.weight",
        "embedder.embedding.1.bias": "proj.bias",
        "int_embedder.weight": "embedding.weight",
    }
    for key, value in sd.items():
        m = re.fullmatch(r"conditioner\.conditioners\.(seconds_start|seconds_total)\.(.+)", key)
        if m and m.group(2) in parts:
            out[f"{m.group(1)}.{parts[m.group(2)]}"] = value
    if not out:
        raise KeyError("no seconds_start / seconds_total conditioner weights in this stable-audio-tools checkpoint")
    return out


def diffusion_state_dict_from_stable_audio_tools(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A whole stable-audio-tools checkpoint → our ``ConditionedDiffusionModel`` state dict (backbone + timing)."""
    out = {f"backbone.{k}": v for k, v in dit_state_dict_from_stable_audio_tools(sd).items()}
    out.update(timing_state_dict_from_stable_audio_tools(sd))
    return out
