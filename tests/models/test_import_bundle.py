"""``longplay weights import SRC --to FOLDER``: a whole Stable Audio Open model as a bundle that generates.

Tiny random stand-ins of the two published layouts, built here: a diffusers ``StableAudioPipeline`` folder (tiny T5,
DiT, projection model, Oobleck VAE) and a stable-audio-tools ``diffusion_cond`` checkpoint with its
``model_config.json`` made from the same weights. The imported bundle, loaded by ``load_bundle``, is checked against
what diffusers' pipeline feeds its transformer and gets back (test_t5.py's approach), and the two imports against
each other.

One preset is added for the duration of this module, in this process only:

- ``tiny-open-h64``: tiny-open with one 64-d head (rotary over 32 channels, 256 timestep features). stable-audio-tools
  rotates max(head_dim // 2, 32) channels of every head and always has 256 timestep features, so a stable-audio-tools
  model cannot have tiny-open's 16-d heads (``test_stable_audio_tools_configs_we_cannot_run_are_refused``); at
  head_dim 64 both layouts compute the same model, as Open's 64-d heads do.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import (
    fixed_batch_loss,
)  # tests/ is on sys.path (pytest puts the rootless conftest's folder there)
from tiny_t5 import write_tiny_t5

from pipeline.components import load_bundle
from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.generate import Bundle
from pipeline.models.conditioning import DIFFUSION_PRESETS, build_diffusion_model
from pipeline.t5 import T5Conditioner
from pipeline.weights.bundle import import_bundle
from train.diffusion import fine_tune_base, text_encoder_of

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel  # noqa: E402
from test_t5 import (  # noqa: E402 - tests/models is on sys.path too: the pipeline-call helpers of the T5 tests
    SECONDS_END,
    SECONDS_START,
    _cosine_dpmsolver,
    _pipeline_transformer_call,
)
from test_weights_autoencoder import _stable_audio_tools_layout as _vae_to_stable_audio_tools  # noqa: E402
from test_weights_dit import _to_stable_audio_tools_layout as _dit_to_stable_audio_tools  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
D = 64  # tiny-open's cond_token_dim = the tiny T5's width, as T5-base's 768 is Open's
FRAMES = 64  # the DiT's sample_size: 64 latent frames = 32 s at the VAE's 2 frames/s
# diffusers kwargs whose derived config is tiny-open's DiT (DIT_PRESETS["tiny"]; dit_config_from_diffusers)
TINY_OPEN_DIT = dict(
    sample_size=FRAMES,
    in_channels=64,
    out_channels=64,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    num_key_value_attention_heads=2,
    cross_attention_dim=D,
    cross_attention_input_dim=D,
    global_states_input_dim=2 * D,  # [start ‖ total]
    time_proj_dim=32,
)
H64 = "tiny-open-h64"
H64_DIT = {**TINY_OPEN_DIT, "attention_head_dim": 64, "num_attention_heads": 1, "num_key_value_attention_heads": 1}
H64_DIT["time_proj_dim"] = 256
# the VAE: 2 stages (hop 8) at 16 Hz, so 2 latent frames/s: Open's 32-s window in 64 frames, and 1 s of audio is cheap
VAE = dict(
    encoder_hidden_size=128,  # = 2 x latent channels: the encoder emits mean and scale
    downsampling_ratios=[2, 4],
    channel_multiples=[1, 2],
    decoder_channels=4,
    decoder_input_channels=64,
    audio_channels=2,
    sampling_rate=16,
)
CAPTIONS = ["a dog barks", "rain on the roof with soft piano"]
TOL = 1e-4  # against diffusers (float32; other kernels)


@pytest.fixture(scope="module", autouse=True)
def presets():
    """tiny-open-h64 (module docstring)."""
    tiny_open = DIFFUSION_PRESETS["tiny-open"]
    h64 = dataclasses.replace(
        tiny_open.dit, num_heads=1, cross_attn_kv_heads=1, rotary_dim=32, timestep_features_dim=256
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DIFFUSION_PRESETS, H64, dataclasses.replace(tiny_open, dit=h64))
        yield


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_t5(tmp_path_factory.mktemp("t5"), d_model=D)


@pytest.fixture(scope="module")
def parts(t5_dir: Path) -> dict[str, torch.nn.Module]:
    """The components both pipelines share: T5 (encoder + tokenizer), projection model (timing), VAE."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderOobleck(**VAE).eval()
    with torch.no_grad():  # non-trivial Snake parameters (zeros would hide reshaping bugs)
        for name, p in vae.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.normal_(0.0, 0.3)
    projection = StableAudioProjectionModel(text_encoder_dim=D, conditioning_dim=D, min_value=0, max_value=512)
    t5 = T5Conditioner.load(str(t5_dir))
    return {"vae": vae, "projection": _perturbed(projection, 1, scale=0.2), "t5": t5.encoder, "tokenizer": t5.tokenizer}


def _perturbed(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Every weight moved off its initial value (LayerNorm affines, zero biases included): nothing is an identity.
    ``scale`` keeps the outputs near 1, where an absolute tolerance means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def _pipeline(parts: dict, dit_kwargs: dict, folder: Path) -> diffusers.StableAudioPipeline:
    """diffusers' pipeline over ``parts`` and a tiny random DiT, saved (save_pretrained) into ``folder``."""
    pipe = diffusers.StableAudioPipeline(
        vae=parts["vae"],
        text_encoder=parts["t5"],
        projection_model=parts["projection"],
        tokenizer=parts["tokenizer"],
        transformer=_perturbed(diffusers.StableAudioDiTModel(**dit_kwargs), 2, scale=0.05),
        scheduler=_cosine_dpmsolver()(),  # SA Open's: sigma 0.3..500, v-prediction
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module")
def reference(parts: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[diffusers.StableAudioPipeline, Path]:
    folder = tmp_path_factory.mktemp("diffusers") / "stable-audio-open"
    return _pipeline(parts, TINY_OPEN_DIT, folder), folder


@pytest.fixture(scope="module")
def imported(reference: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("bundles") / "open"
    return dst, import_bundle(reference[1], dst, preset="tiny-open")


def _check_against_pipeline(bundle: Bundle, pipe: diffusers.StableAudioPipeline, atol: float = TOL) -> dict:
    """The conditioning and one v-prediction per CFG branch of ``bundle`` against the first transformer call of
    ``pipe(CAPTIONS)`` (scale 7, no negative prompt), x_t and t as the transformer got them; the max abs differences."""
    latents = torch.randn(2, 64, FRAMES, generator=torch.Generator().manual_seed(5))
    model = bundle.diffusion
    with torch.no_grad():
        seen = _pipeline_transformer_call(pipe, CAPTIONS, latents)
        tokens, mask = bundle.text.encode(CAPTIONS)
        start, total = torch.full((2,), SECONDS_START), torch.full((2,), SECONDS_END)
        cond, _, global_cond = model.conditioning(tokens, mask, start, total)  # (2, 130, D), _, (2, 2D)
        x, t = seen["hidden_states"], seen["timestep"].expand(2)  # the pipeline's batch: [unconditional; conditional]
        v_cond = model(x[2:], t, tokens, mask, start, total)
        v_uncond = model(x[:2], t, tokens, mask, start, total, uncond=True)
    ctx, glob, v = seen["encoder_hidden_states"], seen["global_hidden_states"][:, 0], seen["output"]
    assert ctx.shape == (4, 130, D) and not ctx[:2].any()  # the null branch: all zeros, timing tokens too
    assert v.abs().mean() > 0.1 and (v[2:] - v[:2]).abs().mean() > 1e-3  # the text changes the prediction
    diffs = {
        "tokens": (cond - ctx[2:]).abs().max().item(),
        "global": (torch.cat([global_cond, global_cond]) - glob).abs().max().item(),
        "v_cond": (v_cond - v[2:]).abs().max().item(),
        "v_uncond": (v_uncond - v[:2]).abs().max().item(),
    }
    assert max(diffs.values()) < atol, diffs
    return diffs


def test_diffusers_folder_imports_as_a_bundle_that_matches_the_pipeline(reference: tuple, imported: tuple) -> None:
    pipe, folder = reference
    dst, summary = imported
    config = json.loads((dst / "config.json").read_text())
    assert config == {
        "kind": "diffusion",
        "preset": "tiny-open",
        "latent_rate": 2.0,
        "latent_channels": 64,
        "window_seconds": 32.0,
        "text_encoder": "t5",
        "t5": str(folder.resolve()),  # T5Conditioner.load reads the pipeline's text_encoder/ and tokenizer/
        "source": {"format": "diffusers", "path": str(folder.resolve())},
    }
    assert sorted(p.name for p in dst.iterdir()) == ["autoencoder", "config.json", "model.safetensors"]
    parameters = sum(p.numel() for part in (pipe.transformer, pipe.projection_model) for p in part.parameters())
    assert summary["components"]["diffusion"]["parameters"] == parameters
    bundle = load_bundle(str(dst), "cpu")
    assert bundle.text_source == ("t5", str(folder.resolve()))
    diffs = _check_against_pipeline(bundle, pipe)
    print(f"diffusers import vs StableAudioPipeline, max abs: {diffs}")

    latents = torch.randn(1, 64, 10, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        decode = (bundle.autoencoder.decode(latents) - pipe.vae.decode(latents).sample).abs().max().item()
    print(f"VAE decode vs AutoencoderOobleck, max abs: {decode}")
    assert decode < TOL

    (audio,) = bundle.generate(["a prompt"], 1.0, steps=2, cfg_scale=7)
    assert audio.shape == (2, 16) and audio.dtype == np.float32 and np.isfinite(audio).all()  # 1 s at 16 Hz


def test_a_full_fine_tune_from_the_imported_bundle_starts_at_its_loss(reference: tuple, imported: tuple) -> None:
    """`train diffusion model.init_from=IMPORTED`: the loop's fresh model takes the imported weights
    (``fine_tune_base``), and its first loss is the imported model's on the same batch, bit for bit, with the bundle's
    T5 as the text conditioner; a fresh model's loss is not."""
    dst, _ = imported
    overrides = [f"model.init_from={dst}", "model.preset=tiny-open", "model.text_encoder=t5", "model.clap=null"]
    cfg = load_config(TrainConfig, REPO / "configs" / "tiny" / "diffusion.yaml", overrides)
    torch.manual_seed(123)
    model = build_diffusion_model("tiny-open")
    base = fine_tune_base(cfg, model)
    assert base is not None and text_encoder_of(cfg, base) == ("t5", str(reference[1].resolve()))
    tokens, mask = base.text.encode(CAPTIONS + ["a third caption"])
    first = fixed_batch_loss(model, tokens, mask)
    assert first == fixed_batch_loss(base.diffusion, tokens, mask)
    torch.manual_seed(123)
    assert first != fixed_batch_loss(build_diffusion_model("tiny-open"), tokens, mask)


@pytest.fixture(scope="module")
def h64(parts: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[diffusers.StableAudioPipeline, Path]:
    folder = tmp_path_factory.mktemp("diffusers") / "h64"
    return _pipeline(parts, H64_DIT, folder), folder


def _write_stable_audio_tools(pipe: diffusers.StableAudioPipeline, folder: Path, dit: dict | None = None) -> Path:
    """The pipeline's DiT, timing conditioners and VAE as a stable-audio-tools checkpoint, with its model_config.json
    (Open's, at this size; ``dit`` overrides its DiT settings). Returns the checkpoint."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = _dit_to_stable_audio_tools(pipe.transformer.state_dict())
    checkpoint.pop("pretransform.model.encoder.layers.0.weight")  # the DiT helper's stand-in for "other parts"
    projection = pipe.projection_model.state_dict()
    for ours, theirs in (("seconds_start", "start"), ("seconds_total", "end")):
        for part in ("0.weights", "1.weight", "1.bias"):
            key = f"{theirs}_number_conditioner.time_positional_embedding.{part}"
            checkpoint[f"conditioner.conditioners.{ours}.embedder.embedding.{part}"] = projection[key]
    vae = _vae_to_stable_audio_tools(pipe.vae.state_dict())
    checkpoint |= {f"pretransform.model.{k}": v for k, v in vae.items()}
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(folder / "model.safetensors"))
    number = {"min_val": 0, "max_val": 512}
    config = {
        "model_type": "diffusion_cond",
        "sample_size": FRAMES * 8,  # audio samples
        "sample_rate": VAE["sampling_rate"],
        "audio_channels": 2,
        "model": {
            "pretransform": {
                "type": "autoencoder",
                "config": {
                    "decoder": {"type": "oobleck", "config": {"final_tanh": False}},
                    "latent_dim": 64,
                    "downsampling_ratio": 8,
                    "io_channels": 2,
                },
            },
            "conditioning": {
                "configs": [
                    {"id": "prompt", "type": "t5", "config": {"t5_model_name": "t5-base", "max_length": 128}},
                    {"id": "seconds_start", "type": "number", "config": number},
                    {"id": "seconds_total", "type": "number", "config": number},
                ],
                "cond_dim": D,
            },
            "diffusion": {
                "cross_attention_cond_ids": ["prompt", "seconds_start", "seconds_total"],
                "global_cond_ids": ["seconds_start", "seconds_total"],
                "type": "dit",
                "config": {
                    "io_channels": 64,
                    "embed_dim": 64,
                    "depth": 2,
                    "num_heads": 1,
                    "cond_token_dim": D,
                    "global_cond_dim": 2 * D,
                    "project_cond_tokens": False,
                    "transformer_type": "continuous_transformer",
                    **(dit or {}),
                },
            },
            "io_channels": 64,
        },
    }
    (folder / "model_config.json").write_text(json.dumps(config, indent=2))
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def sat_checkpoint(h64: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_stable_audio_tools(h64[0], tmp_path_factory.mktemp("sat") / "stable-audio-open")


def test_stable_audio_tools_checkpoint_gives_the_same_model(
    h64: tuple, sat_checkpoint: Path, t5_dir: Path, tmp_path: Path
) -> None:
    pipe, folder = h64
    summary = import_bundle(sat_checkpoint, tmp_path / "sat", preset=H64, t5=str(t5_dir))
    assert summary["source_format"] == "stable-audio-tools" and summary["window_seconds"] == 32.0
    config = json.loads((tmp_path / "sat" / "config.json").read_text())
    assert config["t5"] == str(t5_dir.resolve()) and config["latent_rate"] == 2.0
    import_bundle(folder, tmp_path / "diffusers", preset=H64)
    sat, dif = load_bundle(str(tmp_path / "sat"), "cpu"), load_bundle(str(tmp_path / "diffusers"), "cpu")

    gen = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 64, FRAMES, generator=gen), torch.tensor([0.9, 0.4])
    tokens, mask = sat.text.encode(CAPTIONS)
    start, total = torch.full((2,), SECONDS_START), torch.full((2,), SECONDS_END)
    differences = {}
    with torch.no_grad():
        for branch in ("cond", "uncond"):
            v_sat = sat.diffusion(x, t, tokens, mask, start, total, uncond=branch == "uncond")
            v_dif = dif.diffusion(x, t, tokens, mask, start, total, uncond=branch == "uncond")
            differences[branch] = (v_sat - v_dif).abs().max().item()
    print(f"stable-audio-tools import vs diffusers import, v max abs: {differences}")
    assert max(differences.values()) < 1e-5
    diffs = _check_against_pipeline(sat, pipe)
    print(f"stable-audio-tools import vs StableAudioPipeline, max abs: {diffs}")

    latents = torch.randn(1, 64, 10, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        decode = (sat.autoencoder.decode(latents) - pipe.vae.decode(latents).sample).abs().max().item()
    print(f"stable-audio-tools VAE decode vs AutoencoderOobleck, max abs: {decode}")
    assert decode < TOL


# ---------------------------------------------------------------------------------------------------------------------
# What is refused, and how


def test_the_cross_attention_mask_is_compared(reference: tuple, tmp_path: Path, monkeypatch) -> None:
    """A preset that masks padded text tokens is not the published models (which do not): refused, by name."""
    masked = DIFFUSION_PRESETS["tiny-open"]
    masked = dataclasses.replace(masked, dit=dataclasses.replace(masked.dit, use_cross_attn_mask=True))
    monkeypatch.setitem(DIFFUSION_PRESETS, "tiny-open", masked)
    message = "dit.use_cross_attn_mask: the checkpoint has False, preset tiny-open has True"
    with pytest.raises(ConfigError, match=f"^{message}$"):
        import_bundle(reference[1], tmp_path / "b", preset="tiny-open")
    assert not (tmp_path / "b").exists()


def _edit(config: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for key in parents:
        config = config[int(key)] if isinstance(config, list) else config[key]
    config[last] = value


@pytest.mark.parametrize(
    "key, value, message",
    [
        # tiny-open's 4 heads of 16: stable-audio-tools would rotate 32 channels of each (it cannot run such a DiT)
        ("model.diffusion.config.num_heads", 4, "model.diffusion.config: dit: rotary_dim must be even and <= head_dim"),
        ("model.conditioning.configs.1.config.min_val", 1, "conditioner seconds_start is a 'number' with min_val 1"),
        ("model.diffusion.diffusion_objective", "rectified_flow", "only a v-objective dit is supported"),
    ],
)
def test_stable_audio_tools_configs_we_cannot_run_are_refused(
    sat_checkpoint: Path, t5_dir: Path, tmp_path: Path, key: str, value: object, message: str
) -> None:
    folder = tmp_path / "sat"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(sat_checkpoint)
    config = json.loads((sat_checkpoint.parent / "model_config.json").read_text())
    _edit(config, key, value)
    (folder / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(message)):
        import_bundle(folder / "model.safetensors", tmp_path / "b", preset="tiny-open", t5=str(t5_dir))


def test_t5_of_another_width_and_a_used_destination_are_refused(reference: tuple, tmp_path: Path) -> None:
    narrow = write_tiny_t5(tmp_path / "t5-16", d_model=16)
    with pytest.raises(
        ConfigError, match=r"^--t5: .*t5-16 gives 16-d text tokens, the checkpoint's cond_token_dim is 64"
    ):
        import_bundle(reference[1], tmp_path / "b", preset="tiny-open", t5=str(narrow))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="^--to: .*used is not empty"):
        import_bundle(reference[1], tmp_path / "used", preset="tiny-open")


def _longplay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_cli_names_what_is_wrong(reference: tuple, sat_checkpoint: Path, tmp_path: Path) -> None:
    deeper = tmp_path / "deeper"
    shutil.copytree(reference[1], deeper)
    config = json.loads((deeper / "transformer" / "config.json").read_text())
    (deeper / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    missing = tmp_path / "no-such-t5"
    cases = [
        (["weights", "import", str(deeper)], "dit.depth: the checkpoint has 3, preset tiny-open has 2"),
        (["weights", "import", str(sat_checkpoint)], "--t5: a stable-audio-tools checkpoint does not hold its T5"),
        (["weights", "import", str(sat_checkpoint), "--t5", str(missing)], f"--t5: {missing} does not exist"),
    ]
    for args, message in cases:
        out = _longplay(*args, "--to", str(tmp_path / "bundle"), "--preset", "tiny-open")
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"longplay: error: {message}"), out.stderr
    assert not (tmp_path / "bundle").exists()


def test_cli_generates_from_the_imported_bundle(imported: tuple, tmp_path: Path) -> None:
    import soundfile as sf

    wav = tmp_path / "dog.wav"
    out = _longplay("generate", str(imported[0]), "a dog barks", "--seconds", "1", "--steps", "2", "--output", str(wav))
    assert out.returncode == 0, out.stderr
    audio, rate = sf.read(wav)
    assert rate == VAE["sampling_rate"] and audio.shape == (16, 2)
