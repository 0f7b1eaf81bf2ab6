"""`longplay demo` end to end at the quick size, on the session's local stack: real music rendered with fluidsynth,
audio shards, a trained tiny VAE, latent shards encoded with it, CLAP, diffusion, generation and evaluation.

The full-size demo (`make demo`) runs the same stages with more music and steps; its figures are in the README.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from pipeline import shards

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_quick_demo_runs_every_stage(local_stack):
    import mlflow

    from infra import demo

    report = demo.run_demo(local_stack.state_dir, demo.SIZES["quick"])

    on_disk = json.loads((local_stack.state_dir / "demo" / "report.json").read_text())
    assert on_disk["metrics"] == report["metrics"]
    expected_stages = {
        "stack up", "data demo", "preprocess audio", "preprocess reference", "train vae", "preprocess latents",
        "preprocess reference latents", "train clap", "train diffusion", "generate + evaluate", "total",
    }  # fmt: skip
    assert set(report["timings_s"]) == expected_stages and all(t >= 0 for t in report["timings_s"].values())
    assert report["timings_s"]["total"] >= sum(t for name, t in report["timings_s"].items() if name != "total") - 0.5

    # generated files: 44.1 kHz stereo, exactly the requested length, one per held-out piece
    assert len(report["generated"]) == report["dataset"]["reference_pieces"] == 2
    for row in report["generated"]:
        info = sf.info(row["path"])
        assert (info.samplerate, info.channels, info.frames) == (44100, 2, round(row["seconds"] * 44100))
    assert sorted(r["seconds"] for r in report["generated"]) == [2.0, 3.0]

    # metrics: every one computed, each naming its embedder
    metrics = report["metrics"]
    for name in ("fd", "kl", "clap_score"):
        assert isinstance(metrics[name], float), name
        assert metrics["embedders"][name] and not metrics["paper_embedders"][name]
    assert metrics["timing"]["count"] == 2

    # the learning figures: every training run scored itself on the held-out pieces at its last checkpoint
    learning = report["learning"]
    assert 0.0 <= learning["vae"]["vae_spectral_convergence"] < 2.0
    assert learning["vae"]["vae_silence_below_music_db"] > 40.0  # bias-free VAE: silence decodes to silence
    assert learning["clap"]["holdout_candidates"] == 2 and learning["clap"]["recall_chance_at_1"] == 0.5
    assert 0.0 <= learning["diffusion"]["holdout_timing_within_1s"] <= 1.0
    assert set(learning["diffusion"]) >= {"holdout_clap_score_matched", "holdout_clap_score_shuffled"}
    assert learning["evaluation"]["clap_score_shuffled"] is not None
    assert [Path(p).name for p in report["spectrograms"]] == ["generated.png", "reference.png"]

    # the latent shards were encoded with the trained VAE, not a preset
    latents = shards.read_index("s3://longplay/demo/demo-quick/latents")
    assert latents["vae_id"].startswith("sha256:") and latents["shards"]

    # MLflow: the three training runs and the evaluation run, the models registered with their alias
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("longplay-demo")
    runs = client.search_runs([experiment.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    for name in ("demo-quick-vae", "demo-quick-clap", "demo-quick-diffusion", "demo-quick-evaluate"):
        assert by_name[name].info.status == "FINISHED", name
    for kind in ("vae", "clap", "diffusion"):
        assert client.get_model_version_by_alias(f"demo-quick-{kind}", "current").version
    evaluation = by_name["demo-quick-evaluate"]
    assert evaluation.info.run_id == report["evaluation_run_id"]
    assert any(k.startswith("clap_score.") for k in evaluation.data.metrics)
    logged = {a.path for a in client.list_artifacts(evaluation.info.run_id, "generated")}
    assert logged == {f"generated/{r['id']}.wav" for r in report["generated"]}

    # the experiment is a model-training one, so the MLflow UI opens it on runs and metric charts, not GenAI traces
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
