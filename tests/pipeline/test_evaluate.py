"""`longplay evaluate` around the metrics library: prompt files, reference sets, the report and its timing rows."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from pipeline import evaluate, shards
from pipeline.config import ConfigError, EvaluateConfig

SR = 44100


def _tone(seconds: float, freq: float, channels: int = 2) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return np.tile(0.3 * np.sin(2 * np.pi * freq * t), (channels, 1)).astype(np.float32)


def test_prompt_files_jsonl_and_text(tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"id": "a", "prompt": "piano", "seconds": 3}\n\n{"id": "b", "caption": "organ"}\n')
    assert evaluate.read_prompts(str(rows), 7.0) == [
        evaluate.Prompt("a", "piano", 3.0),
        evaluate.Prompt("b", "organ", 7.0),
    ]
    text = tmp_path / "p.txt"
    text.write_text("solo piano\nstring quartet\n")
    assert [(p.id, p.prompt, p.seconds) for p in evaluate.read_prompts(str(text), 5.0)] == [
        ("0000", "solo piano", 5.0),
        ("0001", "string quartet", 5.0),
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"id": "a", "prompt": "x", "seconds": 0}\n', "line 1 needs a non-empty prompt and seconds > 0"),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "repeats ids"),
        ('{"id": "a", not json\n', "line 1 is not a prompt row"),
        ("\n", "holds no prompts"),
        ('{"id": "../x", "prompt": "y"}\n', "id '../x' must match"),
        ('{"id": "a", "prompt": "x", "seconds": Infinity}\n', "line 1 needs a non-empty prompt and seconds > 0"),
        ('{"id": "a", "prompt": "x", "seconds_start": NaN}\n', "line 1: seconds_start must be finite"),
        ('{"id": "a", "prompt": "x", "seconds_start": Infinity}\n', "line 1: seconds_start must be finite"),
    ],
)
def test_bad_prompt_files_are_config_errors(tmp_path, body, message):
    path = tmp_path / "p.jsonl"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        evaluate.read_prompts(str(path), 5.0)


def test_reference_from_a_folder_and_from_audio_shards(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    sf.write(folder / "x1.wav", _tone(1.0, 440).T, SR)
    sf.write(folder / "x2.flac", _tone(0.5, 220, channels=1).T, 22050)
    (folder / "notes.txt").write_text("not audio")
    found = evaluate.read_reference(str(folder))
    assert sorted(found) == ["x1", "x2"]
    assert found["x1"][0].shape == (2, SR) and found["x2"][1] == 22050

    out = tmp_path / "audio-shards"
    buf = io.BytesIO()
    sf.write(buf, _tone(1.0, 440).T, SR, format="FLAC")
    sample = shards.Sample(key="k1", meta={"caption": "a"}, flac=buf.getvalue())
    stats = shards.write_shard(str(out), "train-000000", [sample])
    shards.write_index(
        str(out), vae_id="none", vae_config_hash="-", latent_channels=2, latent_rate=SR, shards=[stats], errors=[]
    )
    audio, sr = evaluate.read_reference(str(out))["k1"]
    assert sr == SR and np.allclose(audio, _tone(1.0, 440), atol=1e-4)

    shards.write_index(
        str(out), vae_id="preset:tiny@seed0", vae_config_hash="-", latent_channels=64, latent_rate=43.07,
        shards=[stats], errors=[],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="holds latents"):
        evaluate.read_reference(str(out))


def test_evaluate_model_writes_exact_files_and_a_complete_report(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # no MLflow run here (the stack tests cover it)
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"id": "a", "prompt": "0 piano in C major", "seconds": 1.5},
        {"id": "b", "prompt": "3 organ", "seconds": 0.5},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = tmp_path / "ref"
    reference.mkdir()
    sf.write(reference / "a.wav", _tone(2.0, 440).T, SR)
    sf.write(reference / "b.wav", _tone(2.0, 880).T, SR)
    result = evaluate.evaluate_model(
        str(bundle_dir), str(prompts), str(reference), tmp_path / "out", EvaluateConfig(steps=2)
    )

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(r["id"], r["samples"]) for r in report["files"]] == [("a", round(1.5 * SR)), ("b", round(0.5 * SR))]
    for row in report["files"]:
        info = sf.info(row["path"])
        assert (info.samplerate, info.channels, info.frames) == (SR, 2, row["samples"])
    m = report["metrics"]
    assert m["counts"] == {"generated": 2, "reference": 2, "kl_pairs": 2}
    assert all(isinstance(m[k], float) for k in ("fd", "kl", "clap_score"))
    assert m["embedders"]["clap_score"].startswith("longplay-clap-") and not any(m["paper_embedders"].values())
    # timing reads the raw 2 s window (the bundle's training window), not the trimmed file, against the length the
    # model was conditioned on (ceil: 1.5 s -> 2, 0.5 s -> 1): an untrained model fills the whole window
    timing = m["timing"]["per_file"]
    assert [t["requested_s"] for t in timing] == [2.0, 1.0]
    assert [t["nonsilent_s"] for t in timing] == pytest.approx([2.0, 2.0], abs=0.01)  # 86 latent frames = 1.997 s
    assert m["timing"]["median_abs_error_s"] == pytest.approx(0.5, abs=0.01) and m["timing"]["within_tolerance"] == 1
    assert result["mlflow_run_id"] is None and "FD[" in result["table"]


def test_missing_prompt_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--prompts: cannot read"):
        evaluate.read_prompts(str(tmp_path / "nope.jsonl"), 5.0)


def test_unpaired_ids_skip_kl_with_a_note_and_keep_fd(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prompts = tmp_path / "p.txt"  # plain text: ids 0000, 0001 match no reference stem
    prompts.write_text("0 piano in C major\n3 organ in D major\n")
    reference = tmp_path / "ref"
    reference.mkdir()
    for name, freq in (("a", 440), ("b", 880)):
        sf.write(reference / f"{name}.wav", _tone(2.0, freq).T, SR)
    cfg = EvaluateConfig(steps=2, seconds=1.0)
    m = evaluate.evaluate_model(str(bundle_dir), str(prompts), str(reference), tmp_path / "out", cfg)["metrics"]
    assert m["kl"] is None and m["counts"]["kl_pairs"] == 0 and isinstance(m["fd"], float)
    assert any(note.startswith("KL: no generated id matches") for note in m["notes"])
