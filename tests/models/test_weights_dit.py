"""DiT weight import, checked numerically against diffusers' own StableAudioDiTModel (a tiny random config)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.models.conditioning import ConditionedDiffusionModel, DiffusionModelConfig
from pipeline.models.dit import DIT_PRESETS, DiT, DiTConfig
from pipeline.weights.dit import (
    diffusion_state_dict_from_stable_audio_tools,
    dit_config_from_diffusers,
    dit_config_from_stable_audio_tools,
    dit_state_dict_from_diffusers,
    dit_state_dict_from_stable_audio_tools,
    timing_state_dict_from_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import get_1d_rotary_pos_embed  # noqa: E402
from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel  # noqa: E402

TINY = dict(
    sample_size=8,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    num_key_value_attention_heads=1,
    out_channels=4,
    cross_attention_dim=16,
    time_proj_dim=16,
    global_states_input_dim=16,
    cross_attention_input_dim=16,
)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.StableAudioDiTModel(**TINY).eval()
    with torch.no_grad():  # move every weight off its initial value, LayerNorm affines included
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _reference_forward(ref: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, g: torch.Tensor):
    """diffusers' model as its StableAudioPipeline calls it: rotary over head_dim // 2, one global token."""
    rotary = get_1d_rotary_pos_embed(
        TINY["attention_head_dim"] // 2, x.shape[-1] + 1, use_real=True, repeat_interleave_real=False
    )
    return ref(x, t, encoder_hidden_states=ctx, global_hidden_states=g[:, None], rotary_embedding=rotary).sample


def _inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 12, generator=gen)
    t = torch.rand(3, generator=gen)
    ctx = torch.randn(3, 7, 16, generator=gen)
    g = torch.randn(3, 16, generator=gen)
    return x, t, ctx, g


def test_config_from_diffusers(reference: torch.nn.Module) -> None:
    cfg = dit_config_from_diffusers(dict(reference.config))
    assert (cfg.io_channels, cfg.embed_dim, cfg.depth, cfg.num_heads) == (4, 16, 2, 2)
    assert (cfg.cross_attn_kv_heads, cfg.cond_token_dim, cfg.cross_attn_dim, cfg.global_cond_dim) == (1, 16, 16, 16)
    assert cfg.rotary_dim == 4 and cfg.timestep_features_dim == 16 and not cfg.use_cross_attn_mask
    # diffusers' defaults are Stable Audio Open's, which must be our sa-open preset (up to the mask flag)
    assert dit_config_from_diffusers({}) == DIT_PRESETS["sa-open"]


def test_diffusers_weights_give_the_same_output(reference: torch.nn.Module) -> None:
    ours = DiT(dit_config_from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(dit_state_dict_from_diffusers(reference.state_dict()), strict=True)
    x, t, ctx, g = _inputs()
    with torch.no_grad():
        expected = _reference_forward(reference, x, t, ctx, g)
        got = ours(x, t, ctx, None, g)
    assert expected.abs().mean() > 0.1  # a non-trivial output
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def _to_stable_audio_tools_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-express a diffusers state dict in stable-audio-tools' layout, as a full checkpoint (``model.model.``)."""
    out: dict[str, torch.Tensor] = {}
    top = {
        "time_proj.weight": "timestep_features.weight",
        "proj_in.weight": "transformer.project_in.weight",
        "proj_out.weight": "transformer.project_out.weight",
    }
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value[:, None] if key == "time_proj.weight" else value
        elif not key.startswith("transformer_blocks."):
            name = key.replace("timestep_proj", "to_timestep_embed").replace("global_proj", "to_global_embed")
            out[name.replace("cross_attention_proj", "to_cond_embed")] = value
    for i in range(TINY["num_layers"]):
        b, o = f"transformer_blocks.{i}.", f"transformer.layers.{i}."
        for src, dst in [("norm1", "pre_norm"), ("norm2", "cross_attend_norm"), ("norm3", "ff_norm")]:
            out[f"{o}{dst}.gamma"], out[f"{o}{dst}.beta"] = sd[f"{b}{src}.weight"], sd[f"{b}{src}.bias"]
        out[f"{o}self_attn.to_qkv.weight"] = torch.cat([sd[f"{b}attn1.to_{n}.weight"] for n in "qkv"])
        out[f"{o}self_attn.to_out.weight"] = sd[f"{b}attn1.to_out.0.weight"]
        out[f"{o}cross_attn.to_q.weight"] = sd[f"{b}attn2.to_q.weight"]
        out[f"{o}cross_attn.to_kv.weight"] = torch.cat([sd[f"{b}attn2.to_{n}.weight"] for n in "kv"])
        out[f"{o}cross_attn.to_out.weight"] = sd[f"{b}attn2.to_out.0.weight"]
        out[f"{o}ff.ff.0.proj.weight"], out[f"{o}ff.ff.0.proj.bias"] = (
            sd[f"{b}ff.net.0.proj.weight"],
            sd[f"{b}ff.net.0.proj.bias"],
        )
        out[f"{o}ff.ff.2.weight"], out[f"{o}ff.ff.2.bias"] = sd[f"{b}ff.net.2.weight"], sd[f"{b}ff.net.2.bias"]
    full = {f"model.model.{k}": v for k, v in out.items()}
    full["model.model.transformer.rotary_pos_emb.inv_freq"] = torch.ones(2)
    full["pretransform.model.encoder.layers.0.weight"] = torch.ones(1)  # other parts of a checkpoint are ignored
    return full


def test_stable_audio_tools_layout_maps_to_the_same_model(reference: torch.nn.Module) -> None:
    """The fused q/k/v and k/v projections are split in the right order (checked through the model's output)."""
    sat = _to_stable_audio_tools_layout(reference.state_dict())
    ours = DiT(dit_config_from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(dit_state_dict_from_stable_audio_tools(sat), strict=True)
    x, t, ctx, g = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, t, ctx, None, g), _reference_forward(reference, x, t, ctx, g), rtol=0, atol=1e-4
        )
    # LayerNorm betas are optional (zero buffers)
    no_beta = {k: v for k, v in sat.items() if not k.endswith(".beta")}
    assert all(
        not v.any() for k, v in dit_state_dict_from_stable_audio_tools(no_beta).items() if k.endswith("norm_ff.bias")
    )


def test_stable_audio_open_config() -> None:
    """The diffusion section of Stable Audio Open's model_config.json gives our sa-open preset."""
    sa_open = {
        "model": {
            "diffusion": {
                "type": "dit",
                "config": {
                    "io_channels": 64,
                    "embed_dim": 1536,
                    "depth": 24,
                    "num_heads": 24,
                    "cond_token_dim": 768,
                    "global_cond_dim": 1536,
                    "project_cond_tokens": False,
                    "transformer_type": "continuous_transformer",
                },
            }
        }
    }
    assert dit_config_from_stable_audio_tools(sa_open) == DIT_PRESETS["sa-open"]
    with pytest.raises(ValueError, match="adaLN"):
        dit_config_from_stable_audio_tools({**sa_open["model"]["diffusion"]["config"], "global_cond_type": "adaLN"})


def test_unknown_keys_fail_loudly(reference: torch.nn.Module) -> None:
    sd = dict(reference.state_dict())
    sd["transformer_blocks.0.attn1.norm_q.weight"] = torch.ones(8)
    with pytest.raises(KeyError, match="norm_q"):
        dit_state_dict_from_diffusers(sd)
    with pytest.raises(KeyError, match="to_scale_shift_gate"):
        dit_state_dict_from_stable_audio_tools({"transformer.layers.0.to_scale_shift_gate": torch.ones(6)})


def _tiny_dit_for_timing() -> DiTConfig:
    """The tiny DiT with global_cond_dim = 2 x the 16-d timing tokens (start ‖ total), as in Stable Audio Open."""
    return dataclasses.replace(dit_config_from_diffusers(TINY), global_cond_dim=32)


def test_timing_conditioners_match_diffusers_projection_model() -> None:
    torch.manual_seed(0)
    proj = StableAudioProjectionModel(text_encoder_dim=16, conditioning_dim=16, min_value=0, max_value=512).eval()
    cfg = DiffusionModelConfig(
        backbone="dit",
        dit=_tiny_dit_for_timing(),
        io_channels=4,
        cond_token_dim=16,
        timing="fourier",
        timing_global=True,
    )
    model = ConditionedDiffusionModel(cfg).eval()
    missing, unexpected = model.load_state_dict(timing_state_dict_from_diffusers(proj.state_dict()), strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("seconds_")]
    seconds = torch.tensor([0.0, 7.5, 95.0, 700.0])
    with torch.no_grad():
        out = proj(start_seconds=seconds, end_seconds=seconds)
        torch.testing.assert_close(model.seconds_start(seconds), out.seconds_start_hidden_states)
        torch.testing.assert_close(model.seconds_total(seconds), out.seconds_end_hidden_states)


def test_whole_stable_audio_tools_checkpoint() -> None:
    """Backbone + timing conditioners of one checkpoint load strictly into a ConditionedDiffusionModel."""
    reference = diffusers.StableAudioDiTModel(**{**TINY, "global_states_input_dim": 32})
    sat = _to_stable_audio_tools_layout(reference.state_dict())
    gen = torch.Generator().manual_seed(0)
    for name in ("seconds_start", "seconds_total"):
        prefix = f"conditioner.conditioners.{name}.embedder.embedding."
        sat[prefix + "0.weights"] = torch.randn(128, generator=gen)
        sat[prefix + "1.weight"], sat[prefix + "1.bias"] = torch.randn(16, 257, generator=gen), torch.zeros(16)
    cfg = DiffusionModelConfig(
        backbone="dit", dit=_tiny_dit_for_timing(), io_channels=4, cond_token_dim=16, timing="fourier"
    )
    model = ConditionedDiffusionModel(cfg)
    model.load_state_dict(diffusion_state_dict_from_stable_audio_tools(sat), strict=True)
