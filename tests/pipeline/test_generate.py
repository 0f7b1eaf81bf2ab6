"""Generation from a bundle in the export layout the diffusion loop writes (tiny, untrained models)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline import components


def test_generate_returns_exact_lengths_and_is_seeded(bundle_dir):
    bundle = components.load_bundle(str(bundle_dir))
    a, b = bundle.generate(["0 piano in C major", "3 organ in D major"], seconds=2.5, steps=3, seed=7)
    assert a.shape == b.shape == (2, 110250) and a.dtype == np.float32
    assert np.isfinite(a).all() and np.abs(a).max() <= 1.0
    (again,) = bundle.generate(["0 piano in C major"], seconds=2.5, steps=3, seed=7)
    np.testing.assert_allclose(again, a, atol=1e-5)  # same seed, same audio (batch-independent noise per call)
    (other,) = bundle.generate(["0 piano in C major"], seconds=2.5, steps=3, seed=8)
    assert not np.allclose(other, a)
    (long,) = bundle.generate(["1 piano in D major"], seconds=3.7, steps=2, seed=1, sampler="euler")
    assert long.shape == (2, round(3.7 * 44100))  # longer than the training window: the window grows


def test_bad_requests_are_clear(bundle_dir):
    bundle = components.load_bundle(str(bundle_dir))
    with pytest.raises(ValueError, match="seconds"):
        bundle.generate(["x"], seconds=0)
    with pytest.raises(ValueError, match="sampler"):
        bundle.generate(["x"], seconds=1, sampler="ddim")
    (bundle_dir / "broken").mkdir(exist_ok=True)
    (bundle_dir / "broken" / "config.json").write_text(json.dumps({"kind": "clap"}))
    with pytest.raises(ValueError, match="not a diffusion export"):
        components.load_bundle(str(bundle_dir / "broken"))


def test_cli_writes_44k_stereo_wavs_of_the_requested_length(bundle_dir, tmp_path):
    out = tmp_path / "one.wav"
    cmd = [sys.executable, "-m", "infra.cli", "generate", str(bundle_dir), "solo piano", "--seconds", "1.5"]
    run = subprocess.run([*cmd, "--steps", "2", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    audio, rate = sf.read(out, always_2d=True)
    assert rate == 44100 and audio.shape == (round(1.5 * 44100), 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("solo piano\nchurch organ\n")
    cmd = [sys.executable, "-m", "infra.cli", "generate", str(bundle_dir), "--prompts", str(prompts)]
    run = subprocess.run(
        [*cmd, "--seconds", "1", "--steps", "2", "-o", str(tmp_path / "batch")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    written = json.loads(run.stdout)
    assert [w["prompt"] for w in written] == ["solo piano", "church organ"]
    for w in written:
        assert sf.info(w["path"]).frames == 44100 and sf.info(w["path"]).channels == 2
    both = subprocess.run([*cmd, "extra", "--seconds", "1", "-o", "x"], capture_output=True, text=True)
    assert both.returncode == 2


def test_load_clap_gives_the_frozen_clap_and_its_tokenizer(bundle_dir):
    clap, tokenizer, config = components.load_clap(str(bundle_dir / "clap"))  # what diffusion training loads too
    assert config["kind"] == "clap" and not clap.training
    assert not any(p.requires_grad for p in clap.parameters())
    ids, mask = tokenizer.encode_batch(["0 piano in C major"], max_length=clap.config.text.max_tokens)
    assert ids.shape == mask.shape and mask.sum() > 0
    with pytest.raises(ValueError, match=r"bundle\d*: not a clap export \(kind='diffusion'\)"):
        components.load_clap(str(bundle_dir))


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--steps", "0"),
        ("--steps", "-3"),
        ("--steps", "2.5"),
        ("--seconds", "0"),
        ("--seconds", "nan"),
        ("--seconds", "inf"),
        ("--seconds-start", "-1"),
        ("--cfg", "-0.5"),
        ("--cfg", "nan"),
        ("--seed", "-1"),
        ("--seed", str(2**64)),
    ],
)
def test_out_of_range_numbers_exit_2_naming_the_flag(flag, value, tmp_path, capsys):
    """Issue 15 item 14: checked before anything loads (the model path does not even exist), one line, exit 2."""
    from infra import cli

    argv = ["generate", str(tmp_path / "no-model"), "a prompt", "--seconds", "1", "-o", str(tmp_path / "x.wav")]
    assert cli.main([*argv, flag, value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"argument {flag}:" in err and value in err, err
    assert not (tmp_path / "x.wav").exists()


def test_a_model_that_does_not_exist_exits_2_in_one_line(tmp_path, capsys):
    """Before: FileNotFoundError from download_model, a traceback."""
    from infra import cli

    missing = tmp_path / "no-model"
    assert cli.main(["generate", str(missing), "a prompt", "--seconds", "1", "-o", str(tmp_path / "x.wav")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"longplay: error: model: {missing} not found"]


def test_the_training_demo_renders_what_generate_gives(bundle_dir, tmp_path):
    """Issue 12: the demo in train/diffusion.py renders through Bundle.generate, so a demo is what `longplay generate`
    gives for the same prompt, length, steps, guidance and seed (before, its own copy cut int(seconds * rate) samples,
    one short of generate's round() here, and Path.with_suffix named the 1.99999 s files p00_1.wav / p00_1.png)."""
    from pipeline.config import TrainConfig
    from train.diffusion import DEMO_STEPS, render_demos

    bundle = components.load_bundle(str(bundle_dir))
    cfg = TrainConfig.model_validate(
        {
            "kind": "diffusion",
            "data": {"shards": "unused"},
            "model": {"clap": "unused"},
            "run": {"seed": 3},
            "demo_prompts": ["0 piano in C major", "3 organ in D major"],
            "demo_seconds": [1.99999],
        }
    )
    paths = render_demos(bundle, cfg, tmp_path)
    assert [p.name for p in paths] == ["p00_1.99999s.wav", "p00_1.99999s.png", "p01_1.99999s.wav", "p01_1.99999s.png"]
    for p, prompt in enumerate(cfg.demo_prompts):
        (expected,) = bundle.generate([prompt], 1.99999, steps=DEMO_STEPS, cfg_scale=cfg.sample_cfg_scale, seed=3 + p)
        demo, rate = sf.read(paths[2 * p], always_2d=True, dtype="float32")
        assert rate == 44100 and demo.T.shape == expected.shape == (2, 88200)
        np.testing.assert_allclose(demo.T, expected, atol=2**-22)  # 24-bit PCM


def test_cpu_inference_runs_in_bf16_only_where_the_cpu_has_it_and_the_switch_allows(monkeypatch) -> None:
    """bf16 autocast on the CPU halves the DiT's time where the CPU has native bf16 (benchmarks/generate.py); a CPU
    without it would emulate bf16, slower than fp32, and LONGPLAY_CPU_BF16=0 turns it off."""
    from pathlib import Path

    from pipeline import generate

    native = bool(set(Path("/proc/cpuinfo").read_text().split()) & {"avx512_bf16", "amx_bf16"})
    cpu = torch.device("cpu")
    try:
        for env, expected in (("1", native), ("0", False)):
            monkeypatch.setenv("LONGPLAY_CPU_BF16", env)
            generate.cpu_bf16.cache_clear()
            assert generate.cpu_bf16() is expected
            with generate.inference_autocast(cpu):
                assert torch.is_autocast_enabled("cpu") is expected
                y = torch.nn.Linear(4, 4)(torch.ones(1, 4))
            assert y.dtype == (torch.bfloat16 if expected else torch.float32)
            with generate.inference_autocast(cpu, cpu=False):  # the training loop's text encoding: fp32 on the CPU
                assert not torch.is_autocast_enabled("cpu")
    finally:
        generate.cpu_bf16.cache_clear()
