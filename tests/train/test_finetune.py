"""Fine-tuning in one process: where a run starts (``model.init_from``) and the configs it refuses (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundles import CLASSES, fixed_batch_loss, write_base_bundle  # tests/ is on sys.path (rootless conftest)

from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.models.conditioning import build_diffusion_model
from train.diffusion import fine_tune_base

REPO = Path(__file__).resolve().parents[2]
DIFFUSION = REPO / "configs" / "tiny" / "diffusion.yaml"


def test_a_full_fine_tune_starts_at_the_base_models_loss(tmp_path: Path) -> None:
    """The loop builds a fresh model, then ``fine_tune_base`` puts the bundle's weights in: its first loss is the base
    model's loss on the same batch, exactly (a fresh model's is not)."""
    base_dir = write_base_bundle(tmp_path / "base", "clap")
    cfg = load_config(TrainConfig, DIFFUSION, [f"model.init_from={base_dir}", "model.clap=null"])
    torch.manual_seed(123)  # not the base's seed: the weights must come from the bundle
    model = build_diffusion_model(cfg.model.preset)
    fresh = fixed_batch_loss(model, *_tokens(base_dir))
    base = fine_tune_base(cfg, model)
    assert base is not None and base.text_source == ("clap", str(base_dir / "clap"))
    tokens, mask = base.text.encode(CLASSES)
    assert fixed_batch_loss(model, tokens, mask) == fixed_batch_loss(base.diffusion, tokens, mask)
    assert fixed_batch_loss(model, tokens, mask) != fresh


def _tokens(base_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.components import load_text_conditioner

    return load_text_conditioner("clap", str(base_dir / "clap")).encode(CLASSES)


def test_a_base_of_another_preset_or_only_adapters_is_refused(tmp_path: Path) -> None:
    base_dir = write_base_bundle(tmp_path / "base", "clap")
    cfg = load_config(TrainConfig, DIFFUSION, [f"model.init_from={base_dir}", "model.preset=tiny-open"])
    with pytest.raises(ValueError, match="^model.init_from: a tiny bundle; model.preset is tiny-open$"):
        fine_tune_base(cfg, build_diffusion_model("tiny-open"))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    lora = {"rank": 2, "alpha": 2.0, "dropout": 0.0, "target_modules": ["to_q"]}
    config = {"kind": "diffusion", "preset": "tiny", "base": str(base_dir), "lora": lora}
    (adapters / "config.json").write_text(json.dumps(config))
    cfg = load_config(TrainConfig, DIFFUSION, [f"model.init_from={adapters}"])
    with pytest.raises(ValueError, match="^model.init_from: LoRA adapters, not a whole model"):
        fine_tune_base(cfg, build_diffusion_model("tiny"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora.rank=4"], "model.lora.rank: LoRA trains adapters on a diffusion bundle; set model.init_from"),
        (
            ["model.lora.rank=4", "model.init_from=/some/bundle", "deepspeed.zero_stage=3"],
            "deepspeed.zero_stage: LoRA runs under ZeRO 0-2 (the adapters are small; use 2)",
        ),
        (
            ["model.text_encoder=t5", "model.clap=null"],
            "model.t5: text_encoder t5 needs the T5 encoder's directory or URI",
        ),
        (
            ["model.text_encoder=t5", "model.t5=/no/such/t5"],
            "model.t5: nothing at /no/such/t5 (expected config.json or text_encoder/config.json there)",
        ),
        (
            ["model.init_from=/no/such/bundle"],
            "model.init_from: nothing at /no/such/bundle (expected config.json there)",
        ),
    ],
)
def test_bad_fine_tuning_configs_exit_2_naming_the_key(overrides: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", "train", "diffusion", "--config", str(DIFFUSION), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"longplay: error: {message}"]


def test_lora_settings_reach_the_config() -> None:
    cfg = load_config(
        TrainConfig, DIFFUSION, ["model.init_from=x", "model.lora.rank=8", "model.lora.target_modules=[to_q,to_v]"]
    )
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (8, None, ["to_q", "to_v"])
    with pytest.raises(ConfigError, match="^model.lora.dropout"):
        load_config(TrainConfig, DIFFUSION, ["model.init_from=x", "model.lora.rank=8", "model.lora.dropout=1.5"])
