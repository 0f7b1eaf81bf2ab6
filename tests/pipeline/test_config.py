"""Typed configs: YAML + dotted overrides, unknown keys and bad values are one-line errors, exit 2 in the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    EvaluateConfig,
    PreprocessConfig,
    TrainConfig,
    flatten,
    load_config,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*/*.yaml")))
def test_every_shipped_config_loads(path):
    schema = PreprocessConfig if path.stem == "preprocess" else TrainConfig
    cfg = load_config(schema, path)
    if schema is TrainConfig:
        assert cfg.kind == path.stem


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
        [sys.executable, "-m", "pipeline.cli", "config", "validate", "train", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["longplay: error: run.max_stepz: unknown key"]


def test_bad_evaluate_setting_exits_2_naming_the_key():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "evaluate", "m", "--prompts", "p", "steps=0"],
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
        [sys.executable, "-m", "pipeline.cli", "config", "validate", "train", "configs/tiny/clap.yaml"]
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
