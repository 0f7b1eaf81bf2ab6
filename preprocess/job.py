"""The preprocess job: plan shards on the driver, encode them on a pool of workers, then write the index.

    driver:  list SRC ─ sort ─ cut into shards ─ skip shards with a marker ─┐
    workers: ShardWorker.process(shard) × pending shards (Ray actors, or in process)  ◄┘
    driver:  every marker ─→ errors.jsonl, index.json ─→ summary

Why whole shards per call rather than a Ray Data stream of segments: the shard is the unit of output, so making it
also the unit of work and of retry is what keeps the contract easy to prove. A sample is written only inside its
shard's tar; a tar becomes part of the output only when its marker is written, after the upload completed; a worker
that dies loses only the shards it was running, which Ray retries on the restarted actor (``max_task_retries``), and
a retry rebuilds the same bytes. A plan fingerprint (``plan.json``: inputs, VAE, output-shaping config) stops a
rerun into an OUT made from other inputs or settings, so skipped shards never overlap the new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline import shards, storage
from pipeline.config import ConfigError, PreprocessConfig
from preprocess import augment
from preprocess.encode import VaeSpec, resolve_vae
from preprocess.sources import InputItem, ShardPlan, SourceError, list_inputs, plan_shards
from preprocess.worker import ShardResult, ShardWorker

log = logging.getLogger(__name__)

SHARD_RETRIES = 3  # re-runs of a shard whose worker died (Ray restarts the actor)
IN_FLIGHT_PER_WORKER = 2  # one running, one queued, so no worker waits for the driver
PLAN_FILE = "plan.json"


class JobFailed(RuntimeError):
    """Some shards could not be written; the message names them. A rerun redoes only those."""


# ----------------------------------------------------------------------------------------------- plan
def fingerprint(items: list[InputItem], cfg: PreprocessConfig, vae: VaeSpec) -> dict[str, Any]:
    """What decides the shards' contents; two runs into one OUT must agree on all of it.

    With a VAE that includes how it runs: batch size, chunked-encode window, device and weight dtype each change
    the latents' rounding, and one OUT must not hold latents of two numerics. Audio shards depend on none of them.
    """
    listing = "\n".join(f"{i.uri}\t{i.key}" for i in items).encode()
    plan = {
        "format_version": shards.FORMAT_VERSION,
        "inputs": len(items),
        "inputs_sha256": hashlib.sha256(listing).hexdigest(),
        "vae_id": vae.vae_id,
        "vae_config_hash": vae.config_hash,
        "max_seconds": cfg.max_seconds,
        "max_input_seconds": cfg.max_input_seconds,
        "samples_per_shard": cfg.samples_per_shard,
        "split": cfg.split,
        "augment": cfg.augment.model_dump(mode="json"),
    }
    if not vae.audio_only:
        plan.update(
            batch_size=cfg.batch_size, chunk_seconds=cfg.chunk_seconds, use_gpu=cfg.use_gpu, vae_dtype=vae.dtype
        )
    return plan


def claim_out(out: str, plan: dict[str, Any]) -> None:
    """Create OUT/plan.json, or check that the one there is ours (then nothing is written).

    The create is conditional, so of two jobs that start on one OUT at once exactly one writes its plan; the other
    reads that plan and stops (exit 2) unless it is the same plan, whose shards are the same bytes (a resume).
    """
    uri = storage.join(out, PLAN_FILE)
    if storage.create_text(uri, json.dumps(plan, indent=2, sort_keys=True)):
        return
    stored = json.loads(storage.read_text(uri))
    differs = sorted(k for k in plan.keys() | stored.keys() if plan.get(k) != stored.get(k))
    if differs:
        raise ConfigError(
            f"out: {out} holds shards of another job ({', '.join(differs)} differ); use a new OUT or delete it"
        )


def inputs_per_shard(cfg: PreprocessConfig) -> int:
    """Inputs per shard so that short inputs give about ``samples_per_shard`` samples, copies included."""
    copies = cfg.augment.copies if cfg.augment.chain else 0
    return max(1, cfg.samples_per_shard // (1 + copies))


def done_shards(out: str) -> set[str]:
    """Names of shards with a marker, from one listing (not one request per shard)."""
    suffix = ".stats.json"
    return {
        uri.rsplit("/", 1)[-1].removesuffix(suffix)
        for uri in storage.list_uris(storage.join(out, "shards"))
        if uri.endswith(suffix)
    }


# ----------------------------------------------------------------------------------------------- backends
def run_local(plans: list[ShardPlan], out: str, cfg: PreprocessConfig, vae: VaeSpec, on_result: Callable) -> None:
    """All shards in this process, one after another (tests, debugging, a laptop without Ray)."""
    worker = ShardWorker(out, cfg.model_dump(mode="json"), vae, device=_device(cfg))
    for plan in plans:
        try:
            on_result(plan, worker.process(plan), None)
        except Exception as exc:  # recorded; the job fails at the end, other shards still finish
            log.exception("shard %s failed", plan.name)
            on_result(plan, None, exc)


def run_ray(plans: list[ShardPlan], out: str, cfg: PreprocessConfig, vae: VaeSpec, on_result: Callable) -> None:
    """Shards on a pool of ``num_encoders`` Ray actors, each holding the VAE (a GPU each, or a fraction of a CPU).

    An actor that dies is restarted by Ray and its in-flight shards are retried on it (``max_task_retries``);
    a shard that still fails is reported through ``on_result`` and the others go on.
    """
    from pipeline import cluster

    cluster.connect()
    import ray

    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=cfg.cpus_per_encoder,
        num_gpus=1 if cfg.use_gpu else 0,
        scheduling_strategy=cfg.scheduling,  # SPREAD: a lost node then costs the shards of fewer actors
        max_restarts=-1,
        max_task_retries=SHARD_RETRIES,
    )
    actors = [
        actor_cls.remote(out, cfg.model_dump(mode="json"), vae, _device(cfg))
        for _ in range(min(cfg.num_encoders, len(plans)))
    ]
    queue = deque(plans)
    in_flight: dict[Any, tuple[Any, ShardPlan]] = {}

    def submit(actor) -> None:
        if queue:
            plan = queue.popleft()
            in_flight[actor.process.remote(plan)] = (actor, plan)

    try:
        for actor in actors:
            for _ in range(IN_FLIGHT_PER_WORKER):
                submit(actor)
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, plan = in_flight.pop(ref)
            try:
                on_result(plan, ray.get(ref), None)
            except ray.exceptions.RayError as exc:
                log.error("shard %s failed: %s", plan.name, exc)
                on_result(plan, None, exc)
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)


BACKENDS = {"ray": run_ray, "local": run_local}


def _device(cfg: PreprocessConfig) -> str:
    return "cuda" if cfg.use_gpu else "cpu"


# ----------------------------------------------------------------------------------------------- the job
def run(
    src: str,
    out: str,
    vae: str,
    cfg: PreprocessConfig,
    manifest: str | None = None,
    backend: str = "ray",
    progress: bool = True,
    allow_outside_src: bool = False,
) -> dict[str, Any]:
    """Preprocess SRC into OUT; returns the summary. Raises ConfigError (bad usage, exit 2) or JobFailed (exit 1).

    Bad inputs do not fail the job: they are listed in OUT/errors.jsonl with their reason. Manifest rows naming
    files outside SRC are among them unless ``allow_outside_src``.
    """
    started = time.monotonic()
    src, out = _absolute(src), _absolute(out)
    spec = resolve_vae(vae)
    _check_chain(cfg)
    items, missing = list_inputs(src, manifest, allow_outside_src)
    if not items and not missing:
        raise SourceError(f"src: no audio files ({', '.join(('wav', 'flac', 'ogg', 'mp3'))}) under {src}")
    plans = plan_shards(items, inputs_per_shard(cfg), cfg.split)
    claim_out(out, fingerprint(items, cfg, spec))
    done = done_shards(out)
    pending = [p for p in plans if p.name not in done]
    log.info(
        "preprocess %s → %s: %d inputs in %d shards (%d done), vae %s, config %s",
        src,
        out,
        len(items),
        len(plans),
        len(plans) - len(pending),
        spec.vae_id,
        json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
    )

    results: dict[str, ShardResult] = {}
    failures: dict[str, str] = {}
    bar = _progress_bar(len(plans), len(plans) - len(pending), progress)
    planned, planned_at = time.monotonic(), time.time()  # listing, planning and the claim are done
    first_result: list[float] = []

    def on_result(plan: ShardPlan, result: ShardResult | None, exc: BaseException | None) -> None:
        if not first_result:
            first_result.append(time.monotonic())
        if result is None:
            failures[plan.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            results[plan.name] = result
        bar.update(1)
        bar.set_postfix(samples=sum(r.stats.samples for r in results.values()), failed=len(failures))

    try:
        if pending:
            BACKENDS[backend](pending, out, cfg, spec, on_result)
    finally:
        bar.close()
    if failures:
        first = min(failures)
        raise JobFailed(
            f"{len(failures)} of {len(plans)} shards failed ({', '.join(sorted(failures))}); rerun to retry them. "
            f"{first}: {failures[first]}"
        )

    stats = {name: r.stats for name, r in results.items()}
    with ThreadPoolExecutor(max_workers=8) as pool:  # markers of shards done by an earlier run
        skipped = [p.name for p in plans if p.name not in stats]
        stats.update(zip(skipped, pool.map(lambda n: shards.read_stats(out, n), skipped), strict=True))
    errors = sorted(missing + [e for s in stats.values() for e in s.errors], key=lambda e: e["source_uri"])
    index = shards.write_index(
        out,
        vae_id=spec.vae_id,
        vae_config_hash=spec.config_hash,
        latent_channels=spec.latent_channels,
        latent_rate=spec.latent_rate,
        shards=list(stats.values()),
        errors=errors,
        only_if_changed=True,
    )
    wall = time.monotonic() - started
    encoded = sum(r.audio_seconds for r in results.values())
    stages: dict[str, float] = {}
    for r in results.values():
        for stage, value in r.seconds.items():
            stages[stage] = stages.get(stage, 0.0) + value
    return {
        "out": out,
        "inputs": len(items) + len(missing),
        "samples": sum(s.samples for s in stats.values()),
        "errors": len(errors),
        "shards": len(plans),
        "shards_written": sum(not r.skipped for r in results.values()),
        "shards_skipped": len(plans) - sum(not r.skipped for r in results.values()),
        "audio_hours": index["total_hours"],
        "encoded_audio_seconds": round(encoded, 3),
        "wall_seconds": round(wall, 3),
        "audio_seconds_per_second": round(encoded / wall, 3) if wall > 0 else 0.0,
        # Where the time went: listing + planning + claim before any worker ran; the first shard's arrival after
        # that (actor start-up, VAE load and one shard); the workers' stage seconds summed over shards.
        "setup_seconds": round(planned - started, 3),
        "first_shard_seconds": round(first_result[0] - planned, 3) if first_result else None,
        "worker_stage_seconds": {k: round(v, 3) for k, v in sorted(stages.items())},
        **timeline(list(results.values()), planned_at),
    }


def timeline(results: list[ShardResult], planned_at: float) -> dict[str, Any]:
    """What the workers' timeline says about the job's speed, from the shards they wrote in this run:

    - ``workers_ready_seconds``: from the end of planning until the last worker had its VAE loaded (actor start,
      imports, VAE load);
    - ``tail_seconds``: from the first worker running out of shards to the last one finishing (the others idle);
    - ``steady_audio_seconds_per_second``: audio encoded per second while every worker was busy, from the last
      worker's first shard start to the first worker's last shard end (each shard counted by the part of it that
      falls in that window): the rate a longer job approaches, without start-up and tail.

    Times are the workers' wall clocks: exact on one machine, as good as the nodes' clock sync on a cluster."""
    ran: dict[str, list[ShardResult]] = {}
    for r in results:
        if not r.skipped and r.worker:
            ran.setdefault(r.worker, []).append(r)
    if not ran:
        return {}
    first_start = max(min(r.started_at for r in rs) for rs in ran.values())
    last_ends = [max(r.finished_at for r in rs) for rs in ran.values()]
    out: dict[str, Any] = {
        "workers_ready_seconds": round(max(rs[0].worker_ready_at for rs in ran.values()) - planned_at, 3),
        "tail_seconds": round(max(last_ends) - min(last_ends), 3),
        "steady_audio_seconds_per_second": None,
    }
    first_idle = min(last_ends)
    window = first_idle - first_start
    if window > 0:
        audio = 0.0
        for rs in ran.values():
            for r in rs:
                inside = min(r.finished_at, first_idle) - max(r.started_at, first_start)
                if inside > 0:
                    audio += r.audio_seconds * inside / max(r.finished_at - r.started_at, 1e-9)
        out["steady_audio_seconds_per_second"] = round(audio / window, 3)
    return out


def _absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    return uri if storage.is_s3(uri) else os.path.abspath(uri)


def _check_chain(cfg: PreprocessConfig) -> None:
    """Build the augmentation chain and run it once on a second of noise, so a bad chain fails before any work."""
    chain = augment.build_chain(cfg.augment.chain)
    if chain is None:
        return
    import numpy as np

    noise = (np.random.default_rng(0).standard_normal((2, 44100)) * 0.1).astype(np.float32)
    try:
        augment.apply(chain, noise, seed=0)
    except Exception as exc:
        raise ConfigError(f"augment.chain: fails on stereo 44.1 kHz audio ({type(exc).__name__}: {exc})") from None


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="shard", desc="preprocess", file=sys.stderr, disable=not enabled)
