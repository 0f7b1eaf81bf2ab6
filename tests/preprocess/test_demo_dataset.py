"""The demo dataset: music21 corpus pieces rendered by fluidsynth, captioned from their metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from preprocess.demo_dataset import (
    INSTRUMENTS,
    Piece,
    build_demo_dataset,
    candidate_pieces,
    finish_audio,
    require_tools,
)

MISSING = require_tools()
needs_tools = pytest.mark.skipif(MISSING is not None, reason=f"fluidsynth/soundfont/music21 missing: run `{MISSING}`")


def test_caption_names_the_metadata() -> None:
    piece = Piece("bach/bwv66.6.mxl", "Johann Sebastian Bach", "Chorale BWV 66.6", "church organ", "F sharp minor",
                  "4/4", 96, 30.0)  # fmt: skip
    assert piece.caption == (
        "Chorale BWV 66.6 by Johann Sebastian Bach, played on church organ, in F sharp minor, 4/4 time, 96 BPM"
    )


def test_finish_audio_trims_fades_and_normalises() -> None:
    sr = 44100
    audio = np.zeros((40 * sr, 2), np.float32)
    audio[: 35 * sr] = 0.2 * np.sin(np.arange(35 * sr) / 10.0)[:, None]
    out = finish_audio(audio.copy(), max_seconds=30.0)
    assert out.shape == (30 * sr, 2)
    assert np.max(np.abs(out)) == pytest.approx(10 ** (-3 / 20), rel=1e-3)
    assert np.max(np.abs(out[-10:])) < 1e-3  # faded out
    short = finish_audio(audio[: 12 * sr].copy() * np.r_[np.ones(10 * sr), np.zeros(2 * sr)][:, None], 30.0)
    assert short.shape[0] == pytest.approx(10 * sr, abs=2)  # trailing silence dropped
    with pytest.raises(ValueError, match="silent"):
        finish_audio(np.zeros((sr, 2), np.float32), 30.0)


@needs_tools
def test_candidates_are_deterministic_and_mixed() -> None:
    a, b = candidate_pieces(0), candidate_pieces(0)
    assert a == b and a != candidate_pieces(1)
    assert len({path.split("/")[0] for path in a[:10]}) >= 8  # round-robin over composers


@needs_tools
def test_build_half_a_minute(tmp_path) -> None:
    summary = build_demo_dataset(tmp_path, minutes=0.5, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert rows and summary["files"] == len(rows) and summary["seconds"] >= 30.0
    for row in rows:
        info = sf.info(tmp_path / row["path"])
        assert (info.samplerate, info.channels) == (44100, 2)
        assert info.duration > 1.0 and info.duration <= 30.0 + 1e-6
        audio, _ = sf.read(tmp_path / row["path"], dtype="float32")
        assert np.sqrt(np.mean(audio**2)) > 1e-3  # not silent
        assert row["composer"] in row["caption"] and row["instrument"] in row["caption"]
        assert row["instrument"] in INSTRUMENTS
        for column in ("title", "key", "metre", "tempo"):
            assert row[column] and str(row[column]) in row["caption"]
    saved = json.loads((tmp_path / "demo_dataset.json").read_text())
    assert saved["files"] == len(rows) and isinstance(saved["skipped"], list)


def test_missing_tools_name_the_install_command(monkeypatch, capsys) -> None:
    import argparse

    from preprocess import demo_dataset

    monkeypatch.setattr(demo_dataset.shutil, "which", lambda name: None)
    assert demo_dataset.require_tools() == "apt-get install -y fluidsynth fluid-soundfont-gm"
    assert demo_dataset.data_demo(argparse.Namespace(out="unused", minutes=1.0)) == 1
    assert "apt-get install -y fluidsynth fluid-soundfont-gm" in capsys.readouterr().out


def test_excerpt_lengths_are_seeded_per_piece_and_in_range():
    from preprocess.demo_dataset import _excerpt_seconds

    lengths = [_excerpt_seconds(f"bach/bwv{i}.mxl", 0, 3.0, 20.0) for i in range(200)]
    assert all(3.0 <= x <= 20.0 for x in lengths) and len(set(lengths)) > 150
    assert 0.15 < sum(x < 8.0 for x in lengths) / len(lengths) < 0.45  # ~5/17 shorter than the 8 s window
    assert lengths == [_excerpt_seconds(f"bach/bwv{i}.mxl", 0, 3.0, 20.0) for i in range(200)]
    assert _excerpt_seconds("bach/bwv1.mxl", 0, None, 30.0) == 30.0
