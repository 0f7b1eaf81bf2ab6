"""Autoencoder weight import checked numerically against diffusers' own AutoencoderOobleck, through both the
diffusers and the stable-audio-tools key layouts, and the single-file export of ``import_weights``."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from pipeline.components import load_vae
from pipeline.models.autoencoder import Autoencoder, AutoencoderConfig
from pipeline.weights import detect_format, import_weights, load_state_dict_file

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max abs difference allowed against diffusers (float32; ours uses a fused Snake, so not bit-equal)
STAGES = 2  # of the reference model below


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These small convolutions are memory-bound: on the shared 2-core test machine a second intra-op thread
    mostly spins against other suites (measured ~2x slower wall time under load), so use one and restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """A tiny random diffusers Oobleck with non-trivial Snake parameters (zeros would hide reshaping bugs)."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderOobleck(
        encoder_hidden_size=8,
        downsampling_ratios=[2, 4],
        channel_multiples=[1, 2],
        decoder_channels=8,
        decoder_input_channels=4,
        audio_channels=2,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def diffusers_dir(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("oobleck")
    reference.save_pretrained(path)
    return path


def _assert_matches(model: Autoencoder, reference: torch.nn.Module, tanh: bool = False) -> None:
    gen = torch.Generator().manual_seed(1)
    audio = torch.randn(2, 2, 8 * 100, generator=gen) * 0.5
    latents = torch.randn(2, 4, 60, generator=gen)
    with torch.no_grad():
        ref_mean = reference.encode(audio).latent_dist.mean
        ref_audio = reference.decode(latents).sample
        ours_mean, ours_audio = model.encode(audio), model.decode(latents)
    assert ours_mean.shape == ref_mean.shape == (2, 4, 100)
    assert ours_audio.shape == ref_audio.shape == (2, 2, 8 * 60)
    assert (ours_mean - ref_mean).abs().max() < TOL
    assert (ours_audio - (torch.tanh(ref_audio) if tanh else ref_audio)).abs().max() < TOL


def test_diffusers_folder_imports_numerically(reference, diffusers_dir) -> None:
    assert detect_format(diffusers_dir) == "diffusers"
    model = load_vae(diffusers_dir)
    assert model.cfg.strides == (2, 4) and model.latent_channels == 4 and model.cfg.weight_norm
    _assert_matches(model, reference)


def test_weight_norm_can_be_folded_on_import(reference, diffusers_dir) -> None:
    inferred = load_vae(diffusers_dir).cfg
    plain = AutoencoderConfig(**{**inferred.to_dict(), "weight_norm": False})
    model = load_vae(diffusers_dir, config=plain)
    assert not any("parametrizations" in k for k in model.state_dict())
    _assert_matches(model, reference)


def _stable_audio_tools_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers Oobleck state dict to stable-audio-tools' nn.Sequential layout (its OobleckEncoder /
    OobleckDecoder, Snake parameters as (C,)), independently of the mapping under test."""
    unit = {"snake1": 0, "conv1": 1, "snake2": 2, "conv2": 3}
    out = {}
    for key, value in state_dict.items():
        part, rest = key.split(".", 1)
        if m := re.fullmatch(r"block\.(\d+)\.res_unit(\d)\.(\w+)\.(.+)", rest):
            sub = int(m[2]) - 1 + (0 if part == "encoder" else 2)
            new = f"layers.{int(m[1]) + 1}.layers.{sub}.layers.{unit[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"block\.(\d+)\.(snake1|conv1|conv_t1)\.(.+)", rest):
            sub = {"encoder": {"snake1": 3, "conv1": 4}, "decoder": {"snake1": 0, "conv_t1": 1}}[part][m[2]]
            new = f"layers.{int(m[1]) + 1}.layers.{sub}.{m[3]}"
        else:
            name, tail = rest.split(".", 1)
            new = f"layers.{ {'conv1': 0, 'snake1': STAGES + 1, 'conv2': STAGES + 2}[name] }.{tail}"
        out[f"{part}.{new}"] = value.reshape(-1) if key.endswith(("alpha", "beta")) else value
    return out


def test_stable_audio_tools_checkpoint_imports_numerically(reference, tmp_path) -> None:
    sat = {f"pretransform.model.{k}": v for k, v in _stable_audio_tools_layout(reference.state_dict()).items()}
    # the rest of a diffusion checkpoint must be ignored
    sat["conditioner.conditioners.seconds_total.embedder.embedding.1.bias"] = torch.zeros(3)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sat, "global_step": 7}, ckpt)
    assert detect_format(ckpt) == "stable-audio-tools"
    _assert_matches(load_vae(ckpt), reference)

    # a model_config.json beside it supplies what shapes can't tell: stable-audio-tools' decoder final_tanh
    config = {"sample_rate": 44100, "model": {"pretransform": {"config": {"decoder": {"config": {}}}}}}
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    with_tanh = load_vae(ckpt)
    assert with_tanh.cfg.final_tanh
    _assert_matches(with_tanh, reference, tanh=True)


def test_import_weights_writes_a_loadable_single_file(reference, diffusers_dir, tmp_path) -> None:
    dst = tmp_path / "out" / "vae.safetensors"
    summary = import_weights(diffusers_dir, dst)
    assert summary["source_format"] == "diffusers"
    component = summary["components"]["autoencoder"]
    assert component["parameters"] == sum(p.numel() for p in reference.parameters())
    assert component["config"]["strides"] == [2, 4]
    assert detect_format(dst) == "longplay"
    assert all(k.startswith("autoencoder.") for k in load_state_dict_file(dst))
    _assert_matches(load_vae(dst), reference)


def test_unpickling_checkpoints_are_refused(tmp_path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_file(path)


def test_unknown_keys_are_named(reference, tmp_path) -> None:
    sd = dict(reference.state_dict())
    sd["encoder.block.0.mystery.weight"] = torch.zeros(1)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderOobleck"}))
    with pytest.raises(KeyError, match="encoder.block.0.mystery.weight"):
        load_vae(tmp_path)


def test_import_weights_of_a_diffusers_pipeline_folder_includes_the_dit(reference, tmp_path) -> None:
    """The dispatcher hands the transformer to pipeline.weights.dit (owned by the DiT) when that is present."""
    pytest.importorskip("pipeline.weights.dit")
    reference.save_pretrained(tmp_path / "vae")
    dit = diffusers.StableAudioDiTModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        cross_attention_dim=16,
        cross_attention_input_dim=16,
        global_states_input_dim=16,
        time_proj_dim=8,
    )
    dit.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableAudioPipeline"}))
    summary = import_weights(tmp_path, tmp_path / "all.safetensors")
    assert summary["components"]["dit"]["parameters"] == sum(p.numel() for p in dit.parameters())
    keys = load_state_dict_file(tmp_path / "all.safetensors")
    assert any(k.startswith("dit.") for k in keys) and any(k.startswith("autoencoder.") for k in keys)
    _assert_matches(load_vae(tmp_path / "all.safetensors"), reference)
