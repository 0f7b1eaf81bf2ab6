"""The preprocess job on the real local stack: s3:// in and out, Ray actors, faults injected mid-job.

Issue 4's "done when": a mixed input set lands exactly once (or in errors.jsonl) with correct latents and metadata;
the shards read back with plain webdataset and `longplay shards verify`; a rerun uploads nothing; a killed Ray
worker, a killed driver and a restarted S3 server each end with the same sample set as an undisturbed run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from preprocess_fixtures import SR44, longplay_argv, upload_dir, write_clips, write_mixed_inputs

from infra import cli, processes, stack
from pipeline import cluster, shards, storage
from pipeline.config import PreprocessConfig
from preprocess import job

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SPEC_KEYS = set(shards.REQUIRED_META)  # the SPEC §6 field names, kept in one place
MIXED_OVERRIDES = ["samples_per_shard=4", "num_encoders=2", "batch_size=2"]
CLIPS_CFG = {"samples_per_shard": 2, "num_encoders": 2, "batch_size": 2}
CLIPS = 12


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="session")
def ray_client_env(local_stack):
    """Ray's client variables set before `ray_on_stack` imports Ray (which reads RAY_AUTH_MODE at import time);
    listed before `ray_on_stack` so it runs first."""
    cluster.prepare_client_env(local_stack.env["RAY_ADDRESS"])


def _objects(prefix: str) -> dict[str, tuple[str, str]]:
    """Every object under prefix → (ETag, LastModified)."""
    bucket, key = storage.split_s3(prefix)
    out, token = {}, None
    while True:
        kw = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/"} | ({"ContinuationToken": token} if token else {})
        page = storage.s3_client().list_objects_v2(**kw)
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["ETag"], obj["LastModified"].isoformat())
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def _sample_set(out: str) -> dict[str, tuple[str, str, str]]:
    """key → (shard, metadata, sha256 of the latents): what "the same sample set" compares."""
    found = {}
    for uri in shards.shard_uris(out):
        for s in shards.read_shard(uri):
            assert s.key not in found, f"duplicate sample {s.key}"
            digest = hashlib.sha256(s.latents.tobytes()).hexdigest()
            found[s.key] = (uri.rsplit("/", 1)[-1], json.dumps(s.meta, sort_keys=True), digest)
    return found


def _markers(out: str) -> list[str]:
    return [u for u in storage.list_uris(storage.join(out, "shards")) if u.endswith(".stats.json")]


def _wait_for_markers(out: str, at_least: int, thread_or_proc, timeout: float = 240.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(_markers(out))
        if n >= at_least:
            return n
        alive = (
            thread_or_proc.is_alive() if isinstance(thread_or_proc, threading.Thread) else thread_or_proc.poll() is None
        )
        assert alive, "the job ended before it could be disturbed"
        time.sleep(0.05)
    raise AssertionError("no shard finished in time")


def _run_in_thread(src: str, out: str, cfg: PreprocessConfig) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["summary"] = job.run(src, out, "preset:tiny", cfg, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _assert_complete(out: str, reference: str) -> None:
    """Same samples, same bytes as the undisturbed run; every tar has its marker; verify passes."""
    assert _sample_set(out) == _sample_set(reference)
    index, ref_index = shards.read_index(out), shards.read_index(reference)
    assert [(s["name"], s["sha256"]) for s in index["shards"]] == [
        (s["name"], s["sha256"]) for s in ref_index["shards"]
    ]
    names = sorted(_objects(storage.join(out, "shards")))
    tars = [n.removesuffix(".tar") for n in names if n.endswith(".tar")]
    assert tars == [n.removesuffix(".stats.json") for n in names if n.endswith(".stats.json")]
    assert len(names) == 2 * len(index["shards"])  # nothing else (no temp or partial objects)
    assert shards.verify(out).ok


# ----------------------------------------------------------------------------------------------- the mixed set
@pytest.fixture(scope="module")
def mixed(local_stack, ray_client_env, ray_on_stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    good, bad = write_mixed_inputs(root)
    src, out = local_stack.s3_prefix("pp-mixed-src"), local_stack.s3_prefix("pp-mixed-out")
    upload_dir(root, src)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        started = time.monotonic()
        code = cli.main(["preprocess", src, out, *MIXED_OVERRIDES, "--vae", "preset:tiny"])
        print(f"mixed job: {time.monotonic() - started:.1f}s", file=sys.stderr)
    summary = json.loads(stdout.getvalue().strip().splitlines()[-1])
    return {"src": src, "out": out, "good": good, "bad": bad, "code": code, "summary": summary}


def test_every_input_is_in_exactly_one_shard_or_in_errors(mixed):
    src, out = mixed["src"], mixed["out"]
    assert mixed["code"] == 0
    good = {storage.join(src, name): exp for name, exp in mixed["good"].items()}
    bad = {storage.join(src, name): reason for name, reason in mixed["bad"].items()}
    shard_of: dict[str, set[str]] = {}
    for uri in shards.shard_uris(out):
        for s in shards.read_shard(uri):
            shard_of.setdefault(s.meta["source_uri"], set()).add(uri)
    assert set(shard_of) == set(good)
    assert all(len(where) == 1 for where in shard_of.values())
    errors = shards.read_errors(out)
    assert {e["source_uri"]: e["reason"].split(":")[0] for e in errors} == bad
    assert len(errors) == len(bad)
    summary = mixed["summary"]
    assert summary["inputs"] == len(good) + len(bad) and summary["errors"] == len(bad)
    assert summary["samples"] == sum(len(exp.segments(95.0)) for exp in good.values())
    index = shards.read_index(out)
    assert index["errors"]["count"] == len(bad)
    assert index["errors"]["by_reason"] == {r: list(bad.values()).count(r) for r in set(bad.values())}
    assert index["total_hours"] == pytest.approx(sum(e.samples_44k for e in good.values()) / SR44 / 3600, rel=1e-3)


def test_latents_and_metadata_are_right_for_every_sample(mixed):
    src, out = mixed["src"], mixed["out"]
    good = {storage.join(src, name): exp for name, exp in mixed["good"].items()}
    seen = {uri: [] for uri in good}
    for uri in shards.shard_uris(out):
        for s in shards.read_shard(uri):
            assert SPEC_KEYS <= set(s.meta) and shards.KEY_RE.match(s.key)
            exp = good[s.meta["source_uri"]]
            seen[s.meta["source_uri"]].append((s.meta["offset_seconds"], s.latents.shape))
            assert s.latents.dtype == np.float16 and np.isfinite(s.latents).all()
            assert s.meta["seconds_total"] == exp.seconds_total
            assert s.meta["source_sha256"] == exp.sha256
            assert s.meta["sample_rate"] == 44100 and s.meta["augmentation"] is None
            assert s.meta["latent_rate"] == pytest.approx(44100 / 1024) and s.meta["vae_id"] == "preset:tiny@seed0"
    for uri, exp in good.items():
        want = [(pytest.approx(offset), (64, -(-n // 1024))) for offset, n in exp.segments(95.0)]
        assert sorted(seen[uri]) == want, uri
    four_minutes = storage.join(src, "sub/h_wav_8k_mono_4min.wav")
    assert [offset for offset, _ in sorted(seen[four_minutes])] == [0.0, 95.0, 190.0]

    captions = {}
    for uri in shards.shard_uris(out):
        for s in shards.read_shard(uri):
            captions[s.meta["source_uri"].removeprefix(src + "/")] = (s.meta["caption"], s.meta["meta"])
    assert captions["a_wav16_44k_stereo.wav"] == ("a short stereo blip", {"genre": "test", "bpm": 120})
    assert captions["b_wav24_96k_stereo.wav"] == ("high rate noise", {"genre": "noise", "bpm": None})
    assert captions["c_flac_48k_mono.flac"] == ("a mono flac tone", {})
    assert captions["d_ogg_22k_stereo.ogg"] == ("ogg at 22 kHz", {"mood": "calm"})
    assert captions["f_wav_48k_6ch.wav"] == ("", {})


def test_shards_read_back_with_plain_webdataset_and_verify(mixed, local_stack):
    import webdataset as wds

    out = mixed["out"]
    storage.register_webdataset()  # the only project code: WebDataset has no s3:// scheme of its own
    tars = sorted(u for u in storage.list_uris(storage.join(out, "shards")) if u.endswith(".tar"))
    count = 0
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        latents = np.load(io.BytesIO(sample["latents.npy"]), allow_pickle=False)
        assert latents.dtype == np.float16 and latents.shape[0] == 64
        assert sample["__key__"] and meta["source_uri"].startswith(mixed["src"])
        count += 1
    assert count == mixed["summary"]["samples"]
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "shards", "verify", out],
        capture_output=True,
        text=True,
        env=os.environ | local_stack.env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "shards": 4, "samples": count}


def test_rerun_after_completion_uploads_nothing(mixed):
    before = _objects(mixed["out"])
    cfg = PreprocessConfig.model_validate({k: int(v) for k, v in (o.split("=") for o in MIXED_OVERRIDES)})
    summary = job.run(mixed["src"], mixed["out"], "preset:tiny", cfg, progress=False)
    assert summary["shards_written"] == 0 and summary["samples"] == mixed["summary"]["samples"]
    assert _objects(mixed["out"]) == before


# ----------------------------------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
def clips(local_stack, ray_client_env, ray_on_stack, tmp_path_factory):
    """Short clips on S3 and their undisturbed run: the reference every disturbed run must reproduce."""
    root = tmp_path_factory.mktemp("clips")
    write_clips(root, CLIPS, seconds=2.0)
    src, reference = local_stack.s3_prefix("pp-clips-src"), local_stack.s3_prefix("pp-clips-ref")
    upload_dir(root, src)
    cfg = PreprocessConfig.model_validate(CLIPS_CFG)
    summary = job.run(src, reference, "preset:tiny", cfg, progress=False)
    assert summary["samples"] == CLIPS and summary["shards"] == CLIPS // 2
    return {"src": src, "reference": reference, "cfg": cfg}


def _shard_workers(state: str = "ALIVE", actor_id: str | None = None) -> list:
    from ray.util.state import list_actors

    filters = [("class_name", "=", "ShardWorker"), ("state", "=", state)]
    if actor_id:
        filters = [("actor_id", "=", actor_id)]
    return list_actors(filters=filters, detail=True)


def test_a_killed_ray_worker_costs_only_its_shards(clips, local_stack):
    out = local_stack.s3_prefix("pp-kill-worker")
    thread, box = _run_in_thread(clips["src"], out, clips["cfg"])
    deadline = time.monotonic() + 120
    while len(workers := [a for a in _shard_workers() if a.pid]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(workers) == 2, workers
    _wait_for_markers(out, 1, thread)
    # Finished = the marker (stats.json) is written; a tar without one is the shard in flight, which a retry redoes.
    objects = {k: v for k, v in _objects(out).items() if k.endswith((".tar", ".stats.json"))}
    marked = {k.removesuffix(".stats.json") for k in objects if k.endswith(".stats.json")}
    finished_before = {k: v for k, v in objects.items() if k.removesuffix(".stats.json").removesuffix(".tar") in marked}
    assert finished_before, objects
    os.kill(workers[0].pid, signal.SIGKILL)
    assert len(_markers(out)) < CLIPS // 2, "the job must still be running when the worker dies"
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    _assert_complete(out, clips["reference"])
    after = _objects(out)
    assert {k: after[k] for k in finished_before} == finished_before  # shards done before the kill: not redone
    (victim,) = _shard_workers(actor_id=workers[0].actor_id)
    assert victim.num_restarts >= 1  # Ray restarted the actor and retried its shards on it


def test_an_interrupted_run_reruns_to_the_same_sample_set(clips, local_stack):
    out = local_stack.s3_prefix("pp-interrupted")
    overrides = [f"{k}={v}" for k, v in CLIPS_CFG.items()]
    argv = longplay_argv("preprocess", clips["src"], out, *overrides, "--vae", "preset:tiny")
    proc = subprocess.Popen(argv, env=os.environ | local_stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        done = _wait_for_markers(out, 1, proc)
        proc.kill()  # the driver dies mid-job, as with a lost head node or a kill -9
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done < CLIPS // 2 and not storage.exists(storage.join(out, "index.json"))
    summary = job.run(clips["src"], out, "preset:tiny", clips["cfg"], progress=False)
    assert summary["shards_skipped"] >= done
    _assert_complete(out, clips["reference"])


def test_s3_restart_mid_upload_loses_nothing(clips, local_stack):
    out = local_stack.s3_prefix("pp-s3-restart")
    thread, box = _run_in_thread(clips["src"], out, clips["cfg"])
    done = _wait_for_markers(out, 1, thread)
    pgid = local_stack.state.pgids["s3"]
    os.killpg(pgid, signal.SIGKILL)  # a hard crash while shards are being read, encoded and uploaded
    while processes.group_alive(pgid):
        time.sleep(0.05)
    time.sleep(1.0)
    assert thread.is_alive() and done < CLIPS // 2
    stack.up(local_stack.state_dir)  # restarts only S3, on the same port
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    _assert_complete(out, clips["reference"])
