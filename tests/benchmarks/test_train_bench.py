"""benchmarks/train.py, which `make bench` runs, still builds its models and steps them (it had stopped doing either
when diffusion configs started needing a CLAP and the tiny DiT a timing-frame input): two steps of each case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_training_benchmark_runs_and_reports_every_case(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--out", str(tmp_path), "--steps", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "train.json").read_text())
    cases = [(r["preset"], r["loader_workers"], r["micro_batch"], r["parameters"]) for r in report["results"]]
    assert cases == [("tiny", 0, 8, 729_873), ("tiny", 1, 8, 729_873), ("mid", 0, 4, 17_178_897)]
    for r in report["results"]:
        assert r["steps"] == 2 and r["window_frames"] == 345 and r["steps_per_s"] > 0
        assert 0 <= r["data_wait_fraction"] < 1
