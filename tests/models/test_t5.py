"""The T5 text conditioner of Stable Audio Open, on a tiny random T5; checked numerically against diffusers'
StableAudioPipeline (its encode_prompt, and the tensors its __call__ feeds the transformer) built from the same
tiny T5, a tiny StableAudioDiTModel and StableAudioProjectionModel, and our ConditionedDiffusionModel holding
their weights."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_t5 import write_tiny_t5  # tests/ is on sys.path (pytest puts the rootless conftest's folder there)

from pipeline.diffusion import sigma_to_t
from pipeline.models.conditioning import ConditionedDiffusionModel, DiffusionModelConfig
from pipeline.t5 import T5Conditioner
from pipeline.weights.dit import (
    dit_config_from_diffusers,
    dit_state_dict_from_diffusers,
    timing_state_dict_from_diffusers,
)

D = 16  # the tiny T5's width = the conditioning width, as T5-base's 768 is in Stable Audio Open
CAPTIONS = ["a dog barks", "rain on the roof with soft piano and a deep bass synth at 120 bpm", ""]
LONG = " ".join(["loud drums"] * 100)  # 200 words: far past 128 tokens
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json")  # what write_tiny_t5's tokenizer saves


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_t5(tmp_path_factory.mktemp("t5"), d_model=D)


@pytest.fixture(scope="module")
def t5(t5_dir: Path) -> T5Conditioner:
    return T5Conditioner.load(str(t5_dir))


def test_load_and_encode(t5: T5Conditioner) -> None:
    assert (t5.dim, t5.max_tokens, t5.device) == (D, 128, torch.device("cpu"))
    assert not t5.encoder.training and not any(p.requires_grad for p in t5.encoder.parameters())
    tokens, mask = t5.encode(CAPTIONS)
    assert tokens.shape == (3, 128, D) and tokens.dtype == torch.float32
    assert mask.shape == (3, 128) and mask.dtype == torch.bool
    expected = t5.tokenizer(CAPTIONS, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    assert torch.equal(mask, expected["attention_mask"].bool())
    assert mask.sum(1).tolist() == [4, 23, 1]  # words + </s>; "roof", "120" spelled out (▁ r o o f); "" is </s>
    assert not tokens[~mask].any()  # padded positions exactly zero
    assert (tokens[mask].abs().sum(-1) > 0).all()  # real ones not
    again, _ = t5.encode(list(reversed(CAPTIONS)))
    torch.testing.assert_close(again.flip(0), tokens, rtol=0, atol=0)  # per caption, batch-independent
    assert t5.to("cpu") is t5


def test_long_captions_are_truncated(t5: T5Conditioner) -> None:
    tokens, mask = t5.encode([LONG, "a dog barks"])
    assert tokens.shape == (2, 128, D) and mask[0].all()
    ids = t5.tokenizer([LONG], padding="max_length", max_length=128, truncation=True)["input_ids"][0]
    assert len(ids) == 128 and ids[-1] == t5.tokenizer.eos_token_id  # truncation keeps the closing </s>
    short = T5Conditioner(t5.encoder, t5.tokenizer, max_tokens=8)
    tokens8, mask8 = short.encode([LONG])
    assert tokens8.shape == (1, 8, D) and mask8.all()


def test_missing_model_raises(t5_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    untokenized = tmp_path / "no-tokenizer"  # AutoTokenizer alone would load a tokenizer of special tokens here
    untokenized.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(t5_dir / name, untokenized / name)
    for path in (tmp_path / "no-such-model", tmp_path / "empty", untokenized):
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(path))}: no T5 encoder there"):
            T5Conditioner.load(str(path))


def test_diffusers_layout(t5_dir: Path, t5: T5Conditioner, tmp_path: Path) -> None:
    """Stable Audio Open's folder: the encoder in text_encoder/, the tokenizer in tokenizer/."""
    for sub, names in [("text_encoder", ("config.json", "model.safetensors")), ("tokenizer", TOKENIZER_NAMES)]:
        (tmp_path / sub).mkdir()
        for name in names:
            shutil.copy(t5_dir / name, tmp_path / sub / name)
    tokens, _ = T5Conditioner.load(str(tmp_path)).encode(CAPTIONS)
    torch.testing.assert_close(tokens, t5.encode(CAPTIONS)[0], rtol=0, atol=0)


def test_load_never_touches_the_network(t5_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert T5Conditioner.load(str(t5_dir)).encode(["a dog barks"])[1].sum() == 4


def test_tiny_t5_is_deterministic(tmp_path: Path) -> None:
    a = T5Conditioner.load(str(write_tiny_t5(tmp_path / "a", seed=3))).encoder.state_dict()
    b = T5Conditioner.load(str(write_tiny_t5(tmp_path / "b", seed=3))).encoder.state_dict()
    c = T5Conditioner.load(str(write_tiny_t5(tmp_path / "c", seed=4))).encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# Numerical match against diffusers' StableAudioPipeline

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel  # noqa: E402

TINY_DIT = dict(
    sample_size=8,  # latent frames
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    num_key_value_attention_heads=1,
    out_channels=4,
    cross_attention_dim=16,
    time_proj_dim=16,
    global_states_input_dim=2 * D,  # [start ‖ total]
    cross_attention_input_dim=D,
)
SECONDS_START, SECONDS_END = 3.0, 30.0


class _Captured(Exception):
    """Raised by the transformer hook to stop the pipeline after its first denoising call, before the scheduler's
    step (which needs torchsde)."""


def _cosine_dpmsolver() -> type:
    """diffusers' CosineDPMSolverMultistepScheduler, Stable Audio Open's scheduler (timestep 2 atan(sigma) / pi).

    Without torchsde diffusers exports a placeholder that refuses to build. The real class needs torchsde only in
    ``step`` (its Brownian-tree noise), which these tests never reach, so its module is imported with an empty
    stand-in for torchsde, and the stand-in and the modules imported with it are removed from sys.modules again."""
    if importlib.util.find_spec("torchsde") is not None:
        return diffusers.CosineDPMSolverMultistepScheduler
    package = "diffusers.schedulers"
    names = (f"{package}.scheduling_dpmsolver_sde", f"{package}.scheduling_cosine_dpmsolver_multistep")
    sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        return importlib.import_module(names[1]).CosineDPMSolverMultistepScheduler
    finally:
        for name in ("torchsde", *names):
            sys.modules.pop(name, None)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and child in vars(sys.modules[parent]):
                delattr(sys.modules[parent], child)


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight moved off its initial value (LayerNorm affines, zero biases included): nothing is an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def reference(t5: T5Conditioner) -> diffusers.StableAudioPipeline:
    """diffusers' pipeline over the tiny T5 (the same encoder object as ``t5``'s) and tiny random DiT, projection
    model and VAE (the VAE only sets the pipeline's lengths: hop 4 samples, 1 Hz, so 8 latent frames are 32 s)."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderOobleck(
        encoder_hidden_size=4,
        downsampling_ratios=[2, 2],
        channel_multiples=[1, 2],
        decoder_channels=4,
        decoder_input_channels=TINY_DIT["in_channels"],
        audio_channels=1,
        sampling_rate=1,
    )
    projection = StableAudioProjectionModel(text_encoder_dim=D, conditioning_dim=D, min_value=0, max_value=512)
    pipe = diffusers.StableAudioPipeline(
        vae=vae.eval(),
        text_encoder=t5.encoder,
        projection_model=_perturbed(projection, 1),
        tokenizer=t5.tokenizer,
        transformer=_perturbed(diffusers.StableAudioDiTModel(**TINY_DIT), 2),
        scheduler=_cosine_dpmsolver()(),  # SA Open's: sigma 0.3..500, v-prediction
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(reference: diffusers.StableAudioPipeline) -> ConditionedDiffusionModel:
    cfg = DiffusionModelConfig(
        backbone="dit",
        dit=dit_config_from_diffusers(dict(reference.transformer.config)),
        io_channels=TINY_DIT["in_channels"],
        cond_token_dim=D,
        timing="fourier",
        timing_global=True,
        max_text_tokens=128,
    )
    model = ConditionedDiffusionModel(cfg).eval()
    sd = {f"backbone.{k}": v for k, v in dit_state_dict_from_diffusers(reference.transformer.state_dict()).items()}
    model.load_state_dict(sd | timing_state_dict_from_diffusers(reference.projection_model.state_dict()), strict=True)
    return model


def test_text_tokens_match_encode_prompt(t5: T5Conditioner, reference: diffusers.StableAudioPipeline) -> None:
    captions = [*CAPTIONS, LONG]
    with torch.no_grad():
        expected = reference.encode_prompt(captions, torch.device("cpu"), do_classifier_free_guidance=False)
    tokens, _ = t5.encode(captions)
    assert expected.shape == tokens.shape == (4, 128, D) and expected.abs().mean() > 0.1
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-4)


def _pipeline_transformer_call(pipe: diffusers.StableAudioPipeline, captions: list[str], latents: torch.Tensor):
    """The first transformer call of ``pipe(captions)`` with CFG (scale 7, no negative prompt): its keyword inputs
    and output."""
    seen = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        seen.update(zip(("hidden_states", "timestep"), args, strict=True), **kwargs, output=output[0])
        raise _Captured

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(_Captured):
            pipe(
                captions,
                audio_start_in_s=SECONDS_START,
                audio_end_in_s=SECONDS_END,
                num_inference_steps=4,
                guidance_scale=7.0,
                latents=latents,
                output_type="latent",
            )
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("sigma_max", [500.0, 1.0])  # Stable Audio Open's first step (t = 0.9987), and t = 0.5
def test_conditioning_and_v_match_the_pipeline(
    t5: T5Conditioner, reference: diffusers.StableAudioPipeline, ours: ConditionedDiffusionModel, sigma_max: float
) -> None:
    reference.scheduler = _cosine_dpmsolver()(sigma_max=sigma_max)
    captions = CAPTIONS[:2]
    latents = torch.randn(2, 4, TINY_DIT["sample_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        seen = _pipeline_transformer_call(reference, captions, latents)
        tokens, mask = t5.encode(captions)
        start, total = torch.full((2,), SECONDS_START), torch.full((2,), SECONDS_END)
        cond, cond_mask, global_cond = ours.conditioning(tokens, mask, start, total)  # (2, 130, D), _, (2, 2D)

    # the pipeline's batch is [unconditional; conditional]
    ctx, glob, x, t = (
        seen["encoder_hidden_states"],
        seen["global_hidden_states"],
        seen["hidden_states"],
        seen["timestep"],
    )
    assert ctx.shape == (4, 130, D) and glob.shape == (4, 1, 2 * D) and x.shape == (4, 4, 8)
    # (b) cross-attention tokens [text, start, total], and the global [start ‖ total] in both branches
    torch.testing.assert_close(ctx[2:], cond, rtol=0, atol=1e-4)
    assert not ctx[:2].any()  # no negative prompt: all zeros, the timing tokens too
    torch.testing.assert_close(ours.null_conditioning(cond), ctx[:2], rtol=0, atol=0)
    torch.testing.assert_close(glob[:, 0], torch.cat([global_cond, global_cond]), rtol=0, atol=1e-4)
    assert "encoder_attention_mask" not in seen  # the pipeline masks nothing, so neither do we
    assert not ours.cfg.dit.use_cross_attn_mask
    # the pipeline's timestep is 2 atan(sigma) / pi, our t; its input x sqrt(1 + sigma^2) is our x_t (VDenoiser's)
    sigma = reference.scheduler.sigmas[0]  # sigma_max
    assert t.shape == (1,) and torch.allclose(t, sigma_to_t(sigma)[None], rtol=0, atol=1e-6)
    x_t = torch.cat([latents, latents]) * reference.scheduler.init_noise_sigma / torch.sqrt(1 + sigma**2)
    torch.testing.assert_close(x, x_t)

    # (c) one v-prediction per branch, x_t and t as the transformer got them
    with torch.no_grad():
        v_cond = ours(x[2:], t.expand(2), tokens, mask, start, total)
        v_uncond = ours(x[:2], t.expand(2), tokens, mask, start, total, uncond=True)
    v = seen["output"]
    assert v.abs().mean() > 0.1 and (v[2:] - v[:2]).abs().mean() > 1e-3  # the text changes the prediction
    torch.testing.assert_close(v_cond, v[2:], rtol=0, atol=1e-4)
    torch.testing.assert_close(v_uncond, v[:2], rtol=0, atol=1e-4)
