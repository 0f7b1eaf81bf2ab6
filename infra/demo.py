"""``longplay demo`` / ``make demo``: the whole system on real music, on this machine (SPEC §3).

    stack up → data demo (music21 corpus, fluidsynth) → held-out pieces set aside as the reference
    → audio shards on S3 (--vae none) → train a tiny VAE → latent shards on S3 (the trained VAE)
    → train CLAP → train diffusion (conditioned on that CLAP) → generate at several lengths → evaluate

The held-out pieces are also what every training run scores itself on at its checkpoints (``data.holdout_shards``):
the VAE's reconstruction of their audio, CLAP's caption → audio retrieval among their latents, the diffusion
model's timing and CLAP score on their captions. Those learning figures go to MLflow, ``report.json`` and the table.

Every stage is the same code the CLI runs (``preprocess.job.run``, ``train.launch.launch``,
``pipeline.evaluate.evaluate_model``) against the local stack, so the demo is also a smoke test of a user's path.
Everything lands under ``STATE_DIR/demo/`` (``data/``, ``reference/``, ``generated/*.wav``, ``report.json``) and in
MLflow's ``longplay-demo`` experiment: the VAE, CLAP and diffusion runs and the evaluation run.

Re-running is cheap: the dataset is kept, shards with markers are skipped, and a training run whose name already
finished resumes at its last step and only exports again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "longplay-demo"
BUCKET = "s3://longplay/demo"
# Excerpt lengths: about a third of the pieces are shorter than the 8 s training window, which is what teaches the
# model to end on time (their crops carry seconds_total < window, padded with the VAE's silence).
EXCERPT_SECONDS = (3.0, 20.0)
LENGTHS = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)  # requested seconds, cycled over the prompts: the 8 s training window


@dataclass(frozen=True)
class Size:
    """How much the demo does; ``full`` is what ``make demo`` runs, ``quick`` what the test runs."""

    minutes: float
    reference_pieces: int
    vae_steps: int
    clap_steps: int
    diffusion_steps: int
    sampler_steps: int
    prefix: str  # run names and S3 prefixes, so a quick run never resumes a full one


SIZES = {
    "full": Size(20.0, reference_pieces=20, vae_steps=800, clap_steps=600, diffusion_steps=1600, sampler_steps=50,
                 prefix="demo"),
    "quick": Size(2.0, reference_pieces=2, vae_steps=6, clap_steps=6, diffusion_steps=6, sampler_steps=4,
                  prefix="demo-quick"),
}  # fmt: skip


class Timer:
    """Wall time per stage, printed as each ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def stage(self, name: str, fn, *args, **kwargs):
        print(f"== {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)
        return out

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


# ----------------------------------------------------------------------------------------------- stages
def build_data(work: Path, size: Size) -> dict[str, Any]:
    """Render the dataset, then move the last ``reference_pieces`` pieces (with their manifest rows) to
    ``reference/``: music no model sees in training, and what FD and KL compare against.

    Kept between runs; rebuilt when the minutes or the held-out count differ, or an earlier run stopped before the
    split was written (``split.json`` is written last)."""
    from preprocess.demo_dataset import build_demo_dataset

    data, reference, marker = work / "data", work / "reference", work / "split.json"
    wanted = {"minutes": size.minutes, "reference_pieces": size.reference_pieces, "excerpts": list(EXCERPT_SECONDS)}
    if not marker.exists() or json.loads(marker.read_text()) != wanted:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(reference, ignore_errors=True)
        marker.unlink(missing_ok=True)
        build_demo_dataset(data, minutes=size.minutes, min_seconds=EXCERPT_SECONDS[0], max_seconds=EXCERPT_SECONDS[1])
        rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines() if line]
        if len(rows) <= size.reference_pieces:
            raise RuntimeError(f"demo dataset has {len(rows)} pieces; need more than {size.reference_pieces}")
        keep, held = rows[: -size.reference_pieces], rows[-size.reference_pieces :]
        (reference / "audio").mkdir(parents=True)
        for row in held:
            shutil.move(data / row["path"], reference / row["path"])
        _write_jsonl(data / "manifest.jsonl", keep)
        _write_jsonl(reference / "manifest.jsonl", held)
        marker.write_text(json.dumps(wanted))
    summary = json.loads((data / "demo_dataset.json").read_text())
    summary["reference_pieces"] = size.reference_pieces
    summary["train_pieces"] = summary["files"] - size.reference_pieces
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def preprocess(src: Path, out: str, vae: str) -> dict[str, Any]:
    from pipeline.config import PreprocessConfig, load_config
    from preprocess import job

    cfg = load_config(PreprocessConfig, REPO / "configs" / "tiny" / "preprocess.yaml", ["max_seconds=30"])
    return job.run(str(src), out, vae, cfg, progress=False)


def train(kind: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One training run from the tiny preset config; returns its final metrics. Raises if Ray Train failed."""
    from pipeline.config import TrainConfig, load_config
    from train.launch import launch

    items = [f"{key}={json.dumps(value) if isinstance(value, list) else value}" for key, value in overrides.items()]
    cfg = load_config(TrainConfig, REPO / "configs" / "tiny" / f"{kind}.yaml", items)
    result = launch(cfg)
    if result.error is not None:
        raise RuntimeError(f"training {kind} failed: {result.error}")
    return dict(result.metrics or {})


def holdout(out: str) -> dict[str, Any]:
    """Training overrides that score a run on every held-out piece of ``out`` (a preprocess OUT) at checkpoints."""
    return {"data.holdout_shards": out, "data.holdout_split": "train", "data.holdout_samples": 64}


def write_prompts(demo_dir: Path, reference_out: str) -> Path:
    """One prompt per reference piece: its caption, its sample key as id (KL pairs by id), a length from LENGTHS."""
    from pipeline import shards

    rows = []
    for tar in shards.shard_uris(reference_out):
        for sample in shards.read_shard(tar):
            rows.append({"id": sample.key, "prompt": sample.meta["caption"]})
    rows.sort(key=lambda r: r["id"])
    for i, row in enumerate(rows):
        row["seconds"] = LENGTHS[i % len(LENGTHS)]
    path = demo_dir / "prompts.jsonl"
    _write_jsonl(path, rows)
    return path


# ----------------------------------------------------------------------------------------------- the demo
def run_demo(state_dir: Path, size: Size, minutes: float | None = None) -> dict[str, Any]:
    """Run every stage; returns (and writes to ``STATE_DIR/demo/report.json``) what it did, how long each stage
    took, where the files are and the metrics."""
    from infra import stack

    if minutes is not None and minutes != size.minutes:  # another dataset: its own runs and prefixes
        size = Size(**{**size.__dict__, "minutes": minutes, "prefix": f"{size.prefix}-{minutes:g}m"})
    timer = Timer()
    env = timer.stage("stack up", stack.up, state_dir)
    os.environ.update(env)
    demo_dir = state_dir.resolve() / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    p = size.prefix
    audio, reference, latents = f"{BUCKET}/{p}/audio", f"{BUCKET}/{p}/reference", f"{BUCKET}/{p}/latents"
    common = {"run.experiment": EXPERIMENT, "run.checkpoint_uri": f"{BUCKET}/{p}/checkpoints"}
    vae_uri, clap_uri = f"models:/{p}-vae@current", f"models:/{p}-clap@current"

    work = demo_dir / p  # this size's dataset, kept between runs
    dataset = timer.stage("data demo", build_data, work, size)
    timer.stage("preprocess audio", preprocess, work / "data", audio, "none")
    timer.stage("preprocess reference", preprocess, work / "reference", reference, "none")
    reference_latents = f"{BUCKET}/{p}/reference-latents"
    runs = {}
    runs["vae"] = timer.stage(
        "train vae",
        train,
        "vae",
        {**common, "data.shards": audio, "run.name": f"{p}-vae", "run.max_steps": size.vae_steps,
         "run.checkpoint_every": max(3, size.vae_steps // 2), "run.demo_every": size.vae_steps,
         **holdout(reference)},
    )  # fmt: skip
    timer.stage("preprocess latents", preprocess, work / "data", latents, vae_uri)
    timer.stage("preprocess reference latents", preprocess, work / "reference", reference_latents, vae_uri)
    runs["clap"] = timer.stage(
        "train clap",
        train,
        "clap",
        {**common, "data.shards": latents, "model.vae": vae_uri, "run.name": f"{p}-clap",
         "run.max_steps": size.clap_steps, "run.checkpoint_every": max(1, size.clap_steps // 2),
         **holdout(reference_latents)},
    )  # fmt: skip
    runs["diffusion"] = timer.stage(
        "train diffusion",
        train,
        "diffusion",
        {**common, "data.shards": latents, "model.vae": vae_uri, "model.clap": clap_uri, "run.name": f"{p}-diffusion",
         "run.max_steps": size.diffusion_steps, "run.checkpoint_every": max(1, size.diffusion_steps // 2),
         "run.demo_every": size.diffusion_steps, **holdout(reference_latents)},
    )  # fmt: skip
    prompts = write_prompts(work, reference)
    evaluation = timer.stage(
        "generate + evaluate", _evaluate, f"models:/{p}-diffusion@current", prompts, reference, demo_dir, size
    )
    state = stack.StackState.load(state_dir.resolve())
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "size": size.__dict__,
        "mlflow_url": f"http://127.0.0.1:{state.ports['mlflow']}/#/experiments",
        "experiment": EXPERIMENT,
        "dataset": {
            k: dataset[k] for k in ("files", "seconds", "composers", "instruments", "train_pieces", "reference_pieces")
        },
        "models": {"vae": vae_uri, "clap": clap_uri, "diffusion": f"models:/{p}-diffusion@current"},
        "training": {kind: {k: v for k, v in m.items() if isinstance(v, int | float)} for kind, m in runs.items()},
        "generated": [
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "seconds": r["seconds"],
                "path": r["path"],
                "samples": r["samples"],
                "nonsilent_seconds": r["nonsilent_seconds"],
            }
            for r in evaluation["files"]
        ],
        "metrics": evaluation["metrics"],
        "table": evaluation["table"],
        "learning": learning_figures(runs, evaluation["metrics"]),
        "spectrograms": spectrograms(evaluation["files"], work / "reference", demo_dir / "spectrograms"),
        "timings_s": {**timer.seconds, "total": timer.total},
        "evaluation_run_id": evaluation["mlflow_run_id"],
    }
    (demo_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


LEARNING_KEYS = {
    "vae": ("vae_spectral_convergence", "vae_log_mel_distance", "vae_waveform_error", "vae_envelope_correlation",
            "vae_log_spectrogram_correlation", "vae_silence_below_music_db"),
    "clap": ("recall_at_1", "recall_at_5", "recall_chance_at_1", "holdout_candidates"),
    "diffusion": ("holdout_timing_median_abs_error_s", "holdout_timing_within_1s", "holdout_clap_score_matched",
                  "holdout_clap_score_shuffled"),
}  # fmt: skip


def learning_figures(runs: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """What says the models learned, on the held-out pieces: each run's figures at its last checkpoint, and the
    final evaluation's timing and CLAP score (matched vs shuffled pairs)."""
    out = {kind: {k: runs[kind][k] for k in keys if k in runs.get(kind, {})} for kind, keys in LEARNING_KEYS.items()}
    timing = metrics.get("timing") or {}
    out["evaluation"] = {
        "timing_median_abs_error_s": timing.get("median_abs_error_s"),
        "timing_within_1s": timing.get("within_tolerance"),
        "clap_score_matched": metrics.get("clap_score"),
        "clap_score_shuffled": metrics.get("clap_score_shuffled"),
    }
    return out


def spectrograms(files: list[dict[str, Any]], reference: Path, out: Path) -> list[str]:
    """PNG spectrograms of the first generated file and of the held-out piece its prompt came from."""
    import soundfile as sf

    from train.diffusion import write_spectrogram

    if not files:
        return []
    out.mkdir(parents=True, exist_ok=True)
    row = files[0]
    rows = [json.loads(line) for line in (reference / "manifest.jsonl").read_text().splitlines() if line]
    source = next((r for r in rows if r["caption"] == row["prompt"]), None)  # prompts are the pieces' captions
    pairs = [(Path(row["path"]), f"generated: {row['prompt']}", out / "generated.png")]
    if source is not None:
        pairs.append((reference / source["path"], f"reference: {source['caption']}", out / "reference.png"))
    written = []
    for wav, title, png in pairs:
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
        seconds = row["seconds"]
        written.append(str(write_spectrogram(png, audio.T[:, : round(seconds * rate)], rate, title)))
    return written


def _evaluate(model: str, prompts: Path, reference: str, demo_dir: Path, size: Size) -> dict[str, Any]:
    from pipeline.config import EvaluateConfig, TrainConfig, load_config
    from pipeline.evaluate import evaluate_model

    # The guidance the tiny recipe samples with (sample_cfg_scale, 1: at CFG 6 its generations run past the
    # requested length; docs/architecture.md, "Models that learn").
    scale = load_config(TrainConfig, REPO / "configs" / "tiny" / "diffusion.yaml", []).sample_cfg_scale
    cfg = EvaluateConfig(
        steps=size.sampler_steps, cfg_scale=scale, experiment=EXPERIMENT, run_name=f"{size.prefix}-evaluate"
    )
    return evaluate_model(model, str(prompts), reference, demo_dir, cfg)


def print_report(report: dict[str, Any]) -> None:
    data = report["dataset"]
    minutes = data["seconds"] / 60
    held = data["reference_pieces"]
    print(f"\nlongplay demo, {report['date']}: {data['files']} pieces ({minutes:.1f} min, {held} held out)")
    print("\nstage timings (s):")
    for name, seconds in report["timings_s"].items():
        print(f"  {name:22s} {seconds:8.1f}")
    print("\ngenerated (44.1 kHz stereo):")
    for row in report["generated"]:
        print(f"  {row['path']}  {row['seconds']:g} s  (non-silent {row['nonsilent_seconds']:.1f} s)  {row['prompt']}")
    print("\nmetrics:\n" + report["table"])
    print("\nlearning figures on the held-out pieces:")
    for kind, figures in report["learning"].items():
        for name, value in figures.items():
            print(f"  {kind:10s} {name:36s} {'n/a' if value is None else f'{value:.4g}'}")
    print(f"\nMLflow: {report['mlflow_url']} (experiment {report['experiment']})")


def demo_command(args: argparse.Namespace) -> int:
    size = SIZES["quick" if args.quick else "full"]
    report = run_demo(Path(args.state_dir), size, minutes=args.minutes)
    print_report(report)
    return 0
