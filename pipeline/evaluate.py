"""``longplay evaluate MODEL --prompts F --reference OUT``: generate for a prompt file, then the paper's metrics.

    prompts F   .jsonl rows {"id", "prompt" (or "caption"), "seconds" (or "seconds_total"), "seconds_start"?};
                or plain text, one prompt per line (ids 0000, 0001, ...; ``seconds`` from the config)
    reference   a preprocess OUT of audio shards (``--vae none``; ids are the sample keys) or a directory / s3://
                prefix of audio files (ids are the file stems)
    → OUT/generated/{id}.wav    44.1 kHz stereo, trimmed to the requested seconds
      OUT/report.json           the metrics (with the embedder behind each), the settings, one row per file
      stdout                    the metrics table; MLflow (when MLFLOW_TRACKING_URI is set): an evaluation run with
                                the settings as params, the metrics, report.json and the wavs as artifacts

FD compares the generated set with the whole reference set; KL pairs a generated file with the reference of the
same id; the CLAP score pairs each file with its prompt; timing accuracy measures the model's raw output window
(before the trim), so content that runs past the requested length counts as an error.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import metrics, storage
from pipeline.config import ConfigError, EvaluateConfig, load_config

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    seconds: float
    seconds_start: float = 0.0


ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")  # ids name files: the shard KEY rule (SPEC §6), no paths


def read_prompts(path: str, default_seconds: float) -> list[Prompt]:
    """The prompt file: JSON lines (a first line starting with ``{``) with ids and lengths, or one prompt per line.

    Anything unusable is a ConfigError naming the file and line (exit 2)."""
    try:
        text = storage.read_text(path)
    except (OSError, UnicodeDecodeError, storage.StorageError) as exc:
        raise ConfigError(f"--prompts: cannot read {path} ({type(exc).__name__}: {exc})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    json_lines = bool(lines) and lines[0][1].startswith("{")
    prompts: list[Prompt] = []
    for number, line in lines:
        if not json_lines:
            prompts.append(Prompt(f"{len(prompts):04d}", line, default_seconds))
            continue
        try:
            row = json.loads(line)
            prompt = row.get("prompt", row.get("caption"))
            seconds = float(row.get("seconds", row.get("seconds_total", default_seconds)))
            item = Prompt(
                str(row.get("id", f"{len(prompts):04d}")), prompt, seconds, float(row.get("seconds_start", 0))
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"--prompts: {path} line {number} is not a prompt row ({exc})") from None
        if not isinstance(item.prompt, str) or not item.prompt or not 0 < item.seconds < math.inf:
            raise ConfigError(f"--prompts: {path} line {number} needs a non-empty prompt and seconds > 0, finite")
        if not 0 <= item.seconds_start < math.inf:  # also false for nan
            raise ConfigError(f"--prompts: {path} line {number}: seconds_start must be finite and >= 0")
        if not ID_PATTERN.fullmatch(item.id):
            raise ConfigError(f"--prompts: {path} line {number}: id {item.id!r} must match [A-Za-z0-9_-]+")
        prompts.append(item)
    if not prompts:
        raise ConfigError(f"--prompts: {path} holds no prompts")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--prompts: {path} repeats ids (KL pairs files by id)")
    return prompts


def read_reference(uri: str) -> dict[str, tuple[np.ndarray, int]]:
    """Reference audio by id: (audio (C, N) float32, sample rate)."""
    import soundfile as sf

    from pipeline import shards

    def decode(data: bytes) -> tuple[np.ndarray, int]:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return audio.T.copy(), int(sr)

    out: dict[str, tuple[np.ndarray, int]] = {}
    if storage.exists(storage.join(uri, "index.json")):
        index = shards.read_index(uri)
        if index.get("vae_id") != "none":
            raise ConfigError(
                f"--reference: {uri} holds latents (vae_id {index.get('vae_id')}); give audio shards "
                "(preprocess --vae none) or a folder of audio files"
            )
        for tar in shards.shard_uris(uri):
            for sample in shards.read_shard(tar):
                out[sample.key] = decode(sample.flac)
    else:
        for item in sorted(storage.list_uris(uri)):
            if item.lower().endswith(AUDIO_EXTENSIONS):
                key = Path(item.rsplit("/", 1)[-1]).stem
                if key in out:
                    raise ConfigError(f"--reference: two files under {uri} have the id {key!r} (ids are file stems)")
                out[key] = decode(storage.read_bytes(item))
    if not out:
        raise ConfigError(f"--reference: no audio under {uri}")
    return out


def clap_embedder_name(bundle: Any) -> str:
    """``longplay-clap-<8 hex>``: our CLAP, named by its weights so figures from two CLAPs are never mixed."""
    from pipeline.weights import weights_hash

    return f"longplay-clap-{weights_hash(bundle.clap)[:8]}"


def embedders_for(bundle: Any, cfg: EvaluateConfig):
    """The paper's embedders where their weights are configured, else fallbacks built on the bundle's own CLAP."""
    from pipeline.embedders import EmbedderPaths, ProjectClap, select_embedders

    paths = EmbedderPaths(**{k: Path(v) if v else None for k, v in cfg.embedders.model_dump().items()})
    if bundle.clap is None:  # a T5-conditioned bundle has no CLAP of its own: the paper's embedders or none
        return select_embedders(paths, project_clap=None)
    # On the bundle's device: ProjectClap moves the VAE and CLAP it is given, and generation still needs them there.
    project = ProjectClap(
        bundle.autoencoder, bundle.clap, bundle.tokenizer, name=clap_embedder_name(bundle), device=str(bundle.device)
    )
    return select_embedders(paths, project_clap=project)


def target_seconds(p: Prompt) -> float:
    """The length a model that follows its timing condition fills: seconds_total - seconds_start as generation
    conditions them (``ceil(start + seconds)`` and ``floor(start)``, the paper's convention)."""
    return float(math.ceil(p.seconds_start + p.seconds) - math.floor(p.seconds_start))


def generate_all(bundle: Any, prompts: list[Prompt], cfg: EvaluateConfig, out_dir: Path) -> list[dict[str, Any]]:
    """One wav per prompt under ``out_dir/generated`` (trimmed to the request); each row also holds the non-silent
    length of the model's raw output window, measured before the trim (timing accuracy)."""
    from tqdm import tqdm

    from pipeline.generate import write_wav

    rows = []
    (out_dir / "generated").mkdir(parents=True, exist_ok=True)
    for p in tqdm(prompts, desc="generate", unit="file"):
        started = time.perf_counter()
        (raw,) = bundle.generate(
            [p.prompt], p.seconds, p.seconds_start, cfg.steps, cfg.cfg_scale, cfg.seed, cfg.sampler, trim=False
        )
        audio = raw[:, : round(p.seconds * bundle.sample_rate)]
        path = write_wav(out_dir / "generated" / f"{p.id}.wav", audio, bundle.sample_rate)
        rows.append(
            {
                **asdict(p),
                "path": str(path),
                "samples": int(audio.shape[-1]),
                "target_seconds": target_seconds(p),
                "nonsilent_seconds": metrics.nonsilent_seconds(raw, bundle.sample_rate),
                "generate_seconds": round(time.perf_counter() - started, 3),
            }
        )
    return rows


def evaluate_model(
    model: str,
    prompts_path: str,
    reference: str | None,
    out_dir: str | Path,
    cfg: EvaluateConfig,
    device: str | None = None,
) -> dict[str, Any]:
    """Generate, measure, write ``report.json`` and log to MLflow; returns the report as a dict. The bundle runs on
    ``device`` (default CUDA when available, else the CPU)."""
    from pipeline.components import load_bundle
    from pipeline.embedders import evaluate

    out_dir = Path(out_dir)
    prompts = read_prompts(prompts_path, cfg.seconds)
    refs = read_reference(reference) if reference else None
    if refs is not None and not {p.id for p in prompts} & set(refs):
        log.warning("no prompt id matches a reference id: KL (paired by id) will not be computed, FD will")
    # Everything that can fail before the (long) generation does: the model, the embedders, the output folder.
    bundle = load_bundle(model, device)
    embedders = embedders_for(bundle, cfg)
    shutil.rmtree(out_dir / "generated", ignore_errors=True)  # a reused --out never mixes in older files
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = generate_all(bundle, prompts, cfg, out_dir)
    generation_s = time.perf_counter() - started
    report = evaluate(
        embedders,
        generated={r["id"]: r["path"] for r in rows},
        prompts={r["id"]: r["prompt"] for r in rows},
        reference=refs,
        kl_direction=cfg.kl_direction,
    )
    # Timing accuracy from the raw windows (the other metrics read the trimmed files).
    report.timing = metrics.timing_summary([r["nonsilent_seconds"] for r in rows], [r["target_seconds"] for r in rows])
    result = {
        "model": model,
        "prompts": prompts_path,
        "reference": reference,
        "settings": cfg.model_dump(mode="json"),
        "metrics": report.to_dict(),
        "files": rows,
        "seconds": {
            "generation": round(generation_s, 1),
            "metrics": round(time.perf_counter() - started - generation_s, 1),
        },
    }
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, default=metrics.json_default) + "\n")
    result["table"] = metrics.format_table(report)
    result["mlflow_run_id"] = _log_to_mlflow(result, report, out_dir, cfg)
    return result


def _log_to_mlflow(result: dict[str, Any], report: metrics.MetricsReport, out_dir: Path, cfg: EvaluateConfig):
    """An evaluation run (when MLFLOW_TRACKING_URI is set): params, metrics, the report and the wavs."""
    import os

    from pipeline.config import flatten
    from pipeline.tracking import Tracker, git_sha, resolve_model_source

    tracker = Tracker(enabled=bool(os.environ.get("MLFLOW_TRACKING_URI")))
    if not tracker.enabled:
        return None
    import mlflow

    tracker.start(cfg.experiment, cfg.run_name, system_metrics=False)
    status = "FAILED"
    try:
        params = {"model": result["model"], "prompts": result["prompts"], "reference": result["reference"] or "-"}
        params.update({f"eval.{k}": v for k, v in flatten(cfg).items()})
        params.update({f"embedder.{m}": name for m, name in report.embedders.items()})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        tags = {"longplay.kind": "evaluation", "git_sha": git_sha()}
        if result["model"].startswith("models:/"):  # which version the alias pointed at when it was scored
            tags["model_source"] = resolve_model_source(result["model"])
        tracker.set_tags(tags)
        tracker.log_metrics(report.flat_metrics(), step=0)
        tracker.log_artifact(out_dir / "report.json")
        tracker.log_artifacts(out_dir / "generated", "generated")
        status = "FINISHED"
    finally:
        tracker.end(status)
    return tracker.run_id


def evaluate_command(args: argparse.Namespace) -> int:
    """The CLI handler: prints the table (stderr: where the files are) and exits 0."""
    cfg = load_config(EvaluateConfig, args.config, list(args.overrides))
    out_dir = args.out or tempfile.mkdtemp(prefix="longplay-eval-")
    result = evaluate_model(args.model, args.prompts, args.reference, out_dir, cfg, getattr(args, "device", None))
    print(result["table"])
    print(f"report: {Path(out_dir) / 'report.json'}", file=sys.stderr)
    if result["mlflow_run_id"]:
        print(f"mlflow run: {result['mlflow_run_id']}", file=sys.stderr)
    return 0
