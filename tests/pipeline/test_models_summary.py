"""`longplay models summary`: per-component parameter counts of each preset, built on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PAPER = {
    "sa1": {"autoencoder": 133.4e6, "diffusion": 906.7e6},
    "sa-open": {"autoencoder": 156.1e6, "diffusion": 1056.8e6},
}


@pytest.mark.parametrize("preset", ["sa1", "sa-open"])
def test_summary_matches_the_published_sizes(preset):
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", "models", "summary", preset, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)["parameters"]
    assert set(counts) == {"autoencoder", "clap", "diffusion"}
    for name, published in PAPER[preset].items():
        assert abs(counts[name] - published) / published < 0.02, (name, counts[name])
    assert 50e6 < counts["clap"] < 200e6
