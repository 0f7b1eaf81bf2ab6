"""The helpers the three training loops share (train/loop.py), on one process without a process group."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from train import loop


def test_to_device_moves_every_tensor_and_nothing_else() -> None:
    batch = {"x": torch.zeros(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool), "caption": ["a", "b"], "skipped": 1}
    moved = loop.to_device(batch, "meta")  # a device no CPU tensor is on: a tensor left behind would show
    assert {k: v.device.type for k, v in moved.items() if isinstance(v, torch.Tensor)} == {"x": "meta", "mask": "meta"}
    assert moved["mask"].dtype == torch.bool and moved["caption"] == ["a", "b"] and moved["skipped"] == 1
    assert batch["x"].device.type == "cpu"  # the caller's batch is not changed


def test_nonfinite_skips_are_counted_and_a_diverged_run_stops() -> None:
    cfg = TrainConfig.model_validate({"kind": "clap", "data": {"shards": "x"}, "deepspeed": {"grad_accum": 2}})
    progress = loop.Progress("t", cfg, loop.RankContext(), tracker=None, step=0, start_step=0, device="cpu")
    assert not progress.skip_nonfinite(torch.ones(3)) and not progress.skip_nonfinite(torch.ones(3, dtype=torch.long))
    assert progress.skip_nonfinite(torch.tensor([1.0, float("nan")]))
    assert progress.skip_nonfinite(torch.tensor(float("inf")))
    assert progress.totals == {"skipped_samples": 0, "nonfinite_steps": 2} and progress.nonfinite_in_a_row == 2
    progress.add(torch.tensor(3.0), {"kl": 1.0}, samples=4)  # a good micro-step ends the run of skips
    assert progress.nonfinite_in_a_row == 0 and progress.window_loss == 1.5 and progress.window_extra == {"kl": 0.5}
    for _ in range(loop.MAX_NONFINITE_IN_A_ROW - 1):
        assert progress.skip_nonfinite(torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="100 micro-batches in a row"):
        progress.skip_nonfinite(torch.tensor(float("nan")))
