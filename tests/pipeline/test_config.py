"""Typed configs: YAML + dotted overrides, unknown keys and bad values are one-line errors, exit 2 in the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    EvaluateConfig,
    PreprocessConfig,
    TrainConfig,
    deep_merge,
    flatten,
    load_config,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*/*.yaml")))
def test_every_shipped_config_loads(path):
    schema = PreprocessConfig if path.stem == "preprocess" else TrainConfig
    cfg = load_config(schema, path)
    if schema is TrainConfig:  # a training config's file name starts with its kind: diffusion.yaml, diffusion-lora.yaml
        assert cfg.kind == path.stem.split("-")[0]


def test_evaluate_config_loads():
    cfg = load_config(EvaluateConfig, REPO / "configs" / "evaluate.yaml", ["embedders.passt_weights=/w/passt.pt"])
    assert cfg.steps == 100 and cfg.kl_direction == "reference||generated"
    assert cfg.embedders.passt_weights == "/w/passt.pt" and cfg.embedders.openl3_weights is None


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["a.b=3", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 3, "c": "x"}, "d": [1, 2]}
    cfg = load_config(TrainConfig, REPO / "configs/tiny/clap.yaml", ["run.max_steps=7", "deepspeed.zero_stage=2"])
    assert cfg.run.max_steps == 7 and cfg.deepspeed.zero_stage == 2
    assert flatten(cfg)["run.max_steps"] == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("deepspeed.zero_stgae=2", "deepspeed.zero_stgae: unknown key"),
        ("run.max_steps=0", "run.max_steps: Input should be greater than or equal to 1"),
        ("model.preset=huge", "model.preset: Input should be"),
        ("nonsense", "nonsense: override must look like section.key=value"),
        ("run.name=..", "run.name: String should match pattern"),
        ("run.name=.", "run.name: String should match pattern"),
        ("run.name=.hidden", "run.name: String should match pattern"),
        ("run.name=-flag", "run.name: String should match pattern"),
        ("run.name=a/b", "run.name: String should match pattern"),
        ("data.caption_field_dropout=1", "data.caption_field_dropout: Input should be less than 1"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, REPO / "configs/tiny/clap.yaml", [override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_misspelled_key_in_a_file_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/tiny/clap.yaml").read_text().replace("max_steps:", "max_stepz:"))
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", "config", "validate", "train", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["longplay: error: run.max_stepz: unknown key"]


def test_bad_evaluate_setting_exits_2_naming_the_key():
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", "evaluate", "m", "--prompts", "p", "steps=0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["longplay: error: steps: Input should be greater than or equal to 1"]


@pytest.mark.parametrize("betas", ["[0.9, 1.0]", "[-0.1, 0.99]", "[0.9, 1.5]"])
def test_betas_outside_0_1_name_the_key(betas):
    """Issue 15 item 14: AdamW's betas are checked when the config loads (before: a traceback in the worker)."""
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, REPO / "configs/tiny/clap.yaml", [f"deepspeed.betas={betas}"])
    assert str(err.value).startswith("deepspeed.betas: Value error, each beta must be in [0, 1)"), err.value


def test_bad_betas_exit_2_in_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", "config", "validate", "train", "configs/tiny/clap.yaml"]
        + ["deepspeed.betas=[0.9, 1.0]"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "longplay: error: deepspeed.betas: Value error, each beta must be in [0, 1), got [0.9, 1.0]"
    ]


@pytest.mark.parametrize(
    "override, key",
    [
        ("seconds=.inf", "seconds"),
        ("seconds=.nan", "seconds"),
        ("cfg_scale=.inf", "cfg_scale"),
        ("cfg_scale=.nan", "cfg_scale"),
        ("seed=-1", "seed"),
        (f"seed={2**64}", "seed"),
    ],
)
def test_evaluate_numbers_are_finite_and_in_range(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(EvaluateConfig, None, [override])
    assert str(err.value).startswith(f"{key}: "), err.value
    assert load_config(EvaluateConfig, None, [f"seed={2**64 - 1}"]).seed == 2**64 - 1


@pytest.mark.parametrize(
    "path, overrides, message",
    [
        (
            "configs/tiny/diffusion.yaml",
            ["model.clap=null"],
            "model.clap: diffusion needs a trained CLAP (path, s3:// URI or models:/NAME@ALIAS)",
        ),
        (
            "configs/tiny/clap.yaml",
            ["deepspeed.precision=fp16"],
            "deepspeed.precision: fp16 needs scaling.use_gpu=true (use fp32 or bf16 on CPU)",
        ),
    ],
)
def test_rules_across_sections_are_the_schemas(path, overrides, message):
    """Issue 12: 'diffusion needs a CLAP' and 'fp16 needs a GPU' hold wherever a TrainConfig is made (the CLI, the demo,
    a Ray worker), as one line naming the key, and `config validate` exits 2 with it."""
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, REPO / path, overrides)
    assert str(err.value) == message
    raw = deep_merge(yaml.safe_load((REPO / path).read_text()), parse_overrides(overrides))
    with pytest.raises(ValueError, match=re.escape(message)):  # also without load_config: a Ray worker's way
        TrainConfig.model_validate(raw)
    assert load_config(TrainConfig, REPO / path, [*overrides, "scaling.use_gpu=true", "model.clap=m"])
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", "config", "validate", "train", path, *overrides],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"longplay: error: {message}"]


def test_preset_and_sampler_names_come_from_their_registries():
    from pipeline.diffusion import SAMPLERS
    from pipeline.models.presets import PRESETS

    for preset in PRESETS:
        assert load_config(TrainConfig, REPO / "configs/tiny/clap.yaml", [f"model.preset={preset}"]).model.preset
    for sampler in SAMPLERS:
        assert load_config(EvaluateConfig, None, [f"sampler={sampler}"]).sampler == sampler
    with pytest.raises(ConfigError, match="sampler: Input should be 'dpmpp-3m-sde', 'dpmpp-2m' or 'euler'"):
        load_config(EvaluateConfig, None, ["sampler=ddim"])
    assert EvaluateConfig().sampler == next(iter(SAMPLERS))  # the registry's first is the default
