"""The export under ``{checkpoint_uri}/{run}/export`` when a second export crashes halfway (issue 15 item 10): a reader
through the pointer gets the whole first export, never a mix (local checkpoint dir; no service, the engine stubbed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.tracking import download_model
from train import loop


class _Tracker:
    enabled, run_id = True, "r"

    def log_artifacts(self, *a, **k):
        pass

    def register(self, *a, **k):
        return "1"


def _export(cfg: TrainConfig, value: float) -> None:
    def write(directory: Path) -> None:
        (directory / "weights.json").write_text(json.dumps(weights["w"].tolist()))
        (directory / "extra.txt").write_text(f"export {value:g}")

    weights = {"w": torch.full((2,), value)}
    loop.export("t", cfg, _Tracker(), weights, int(value), write)


def test_a_crashed_export_leaves_the_previous_one_whole(tmp_path, monkeypatch) -> None:
    """Before: export/extra.txt came from the second export and weights.json from the first."""
    cfg = TrainConfig.model_validate(
        {"kind": "clap", "data": {"shards": str(tmp_path)}, "run": {"name": "t", "checkpoint_uri": str(tmp_path)}}
    )
    _export(cfg, 1.0)
    real_write, written = storage.write_file, []

    def crash_after_one(uri, path):
        if written:
            raise OSError("killed")
        written.append(uri)
        real_write(uri, path)

    monkeypatch.setattr(storage, "write_file", crash_after_one)
    with pytest.raises(OSError):
        _export(cfg, 2.0)
    monkeypatch.setattr(storage, "write_file", real_write)
    got = download_model(str(tmp_path / "t" / "export"))
    assert (got / "extra.txt").read_text() == "export 1"
    assert json.loads((got / "weights.json").read_text()) == [1.0, 1.0]
    _export(cfg, 3.0)  # the next export completes: readers move to it at once
    got = download_model(str(tmp_path / "t" / "export"))
    assert (got / "extra.txt").read_text() == "export 3" and json.loads((got / "weights.json").read_text()) == [3, 3]
    # readers of the plain files (components.load_vae, preprocess --vae) find the newest whole copy too
    assert (tmp_path / "t" / "export" / "extra.txt").read_text() == "export 3"
