"""The job on local directories with the in-process backend: reruns, audio shards, augmented copies, CLI codes."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from preprocess_fixtures import write_clips

from infra import cli
from pipeline import shards, storage
from pipeline.config import ConfigError, PreprocessConfig
from preprocess import job, sources, worker
from preprocess.encode import resolve_vae


def _cfg(**kw) -> PreprocessConfig:
    return PreprocessConfig.model_validate({"samples_per_shard": 2, "max_seconds": 1.0, **kw})


def _samples(out: str) -> list[shards.Sample]:
    return [s for uri in shards.shard_uris(out) for s in shards.read_shard(uri)]


def _mtimes(out: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(Path(out).rglob("*")) if p.is_file()}


def test_rerun_skips_done_shards_and_writes_nothing(tmp_path):
    expected = write_clips(tmp_path / "src", 5, seconds=0.4)
    out = str(tmp_path / "out")
    first = job.run(str(tmp_path / "src"), out, "preset:tiny", _cfg(), backend="local", progress=False)
    assert first["shards"] == 3 and first["shards_written"] == 3 and first["samples"] == 5 and first["errors"] == 0
    assert sorted(s.meta["source_uri"].rsplit("/", 1)[-1] for s in _samples(out)) == sorted(expected)
    before = _mtimes(out)
    again = job.run(str(tmp_path / "src"), out, "preset:tiny", _cfg(), backend="local", progress=False)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3 and again["samples"] == 5
    assert _mtimes(out) == before  # not one file rewritten, index included

    os.remove(shards.stats_uri(out, "train-000001"))  # as if the job died between tar and marker
    third = job.run(str(tmp_path / "src"), out, "preset:tiny", _cfg(), backend="local", progress=False)
    assert third["shards_written"] == 1 and third["samples"] == 5
    assert shards.verify(out).ok


def test_the_summary_says_where_the_time_went(tmp_path):
    """Issue 14's profile, from the job itself: setup before any worker, the first shard's arrival, and the workers'
    seconds per stage summed over the shards written (a rerun that writes nothing has none)."""
    write_clips(tmp_path / "src", 5, seconds=0.4)
    out = str(tmp_path / "out")
    summary = job.run(str(tmp_path / "src"), out, "preset:tiny", _cfg(), backend="local", progress=False)
    stages = summary["worker_stage_seconds"]
    assert set(stages) == {"wait", "segment_augment", "encode", "write", "fetch", "decode", "total"}
    assert all(v >= 0 for v in stages.values()) and stages["encode"] > 0 and stages["decode"] > 0
    on_thread = stages["wait"] + stages["segment_augment"] + stages["encode"] + stages["write"]
    assert on_thread <= stages["total"] + 1e-3 and summary["setup_seconds"] >= 0
    assert 0 < summary["first_shard_seconds"] <= summary["wall_seconds"]
    # One worker: no tail, ready before its first shard, and its steady rate is its audio over its busy span.
    assert summary["tail_seconds"] == 0 and 0 <= summary["workers_ready_seconds"] < summary["wall_seconds"]
    assert summary["steady_audio_seconds_per_second"] >= summary["audio_seconds_per_second"] > 0
    again = job.run(str(tmp_path / "src"), out, "preset:tiny", _cfg(), backend="local", progress=False)
    assert again["worker_stage_seconds"] == {} and again["first_shard_seconds"] is None
    assert "steady_audio_seconds_per_second" not in again


def test_the_timeline_separates_start_up_steady_state_and_tail():
    """Two workers, times in seconds after planning: A ready at 1, shards [0, 10] and [10, 20] of 100 s of audio
    each; B ready at 3, shards [4, 14] (100 s) and [14, 18] (50 s). Both are busy from 4 to 18: A contributes 60 + 80
    s of audio to that window, B 100 + 50, so 290 s in 14 s; then A runs alone for 2 s."""
    stats = shards.ShardStats(name="x", samples=1, bytes=1, sha256="", errors=[])

    def shard(who: str, ready: float, start: float, end: float, audio: float) -> worker.ShardResult:
        return worker.ShardResult(stats, 1, audio, worker=who, worker_ready_at=1000 + ready,
                                  started_at=1000 + start, finished_at=1000 + end)  # fmt: skip

    results = [shard("a", 1, 0, 10, 100), shard("a", 1, 10, 20, 100), shard("b", 3, 4, 14, 100)]
    results += [shard("b", 3, 14, 18, 50), dataclasses.replace(shard("c", 0, 0, 30, 0), skipped=True)]
    assert job.timeline(results, planned_at=1000) == {
        "workers_ready_seconds": 3.0,
        "tail_seconds": 2.0,
        "steady_audio_seconds_per_second": round(290 / 14, 3),
    }
    assert job.timeline([dataclasses.replace(r, skipped=True) for r in results], planned_at=1000) == {}


def test_an_out_of_another_job_is_refused(tmp_path):
    write_clips(tmp_path / "src", 3, seconds=0.3)
    out = str(tmp_path / "out")
    job.run(str(tmp_path / "src"), out, "preset:tiny", _cfg(), backend="local", progress=False)
    with pytest.raises(ConfigError, match="samples_per_shard"):
        job.run(str(tmp_path / "src"), out, "preset:tiny", _cfg(samples_per_shard=3), backend="local", progress=False)
    write_clips(tmp_path / "src", 4, seconds=0.3)  # a new file would shift the shard assignment
    with pytest.raises(ConfigError, match="inputs"):
        job.run(str(tmp_path / "src"), out, "preset:tiny", _cfg(), backend="local", progress=False)


def test_two_jobs_racing_for_one_out_exactly_one_claims_it(tmp_path, monkeypatch):
    """Issue 15 item 4: two jobs start on one OUT at once with different plans; one claims it, the other exits 2."""
    out = str(tmp_path / "out")
    read_text, arrived = storage.read_text, []

    def slow_read(uri):  # a reader of plan.json waits (up to 2 s) for the other to have read too: the race, certain
        arrived.append(uri)
        try:
            return read_text(uri)
        finally:
            deadline = time.monotonic() + 2.0
            while len(arrived) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)

    monkeypatch.setattr(job.storage, "read_text", slow_read)
    outcome: dict[int, str] = {}

    def claim(batch_size: int) -> None:
        try:
            job.claim_out(out, {"batch_size": batch_size})
            outcome[batch_size] = "claimed"
        except ConfigError as exc:
            outcome[batch_size] = str(exc)

    threads = [threading.Thread(target=claim, args=(b,)) for b in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = [b for b, o in outcome.items() if o == "claimed"]
    assert len(winner) == 1, outcome
    loser = 3 - winner[0]
    assert "batch_size differ" in outcome[loser]
    assert json.loads(read_text(os.path.join(out, job.PLAN_FILE))) == {"batch_size": winner[0]}
    job.claim_out(out, {"batch_size": winner[0]})  # the winner's own rerun resumes
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_the_plan_holds_every_setting_that_changes_latents(tmp_path):
    """Issue 15 item 4: batch size, chunk window, device and VAE dtype each change the latents' rounding."""
    write_clips(tmp_path / "src", 2, seconds=0.3)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    job.run(src, out, "preset:tiny", _cfg(), backend="local", progress=False)
    for key, value in [("batch_size", 1), ("chunk_seconds", 0.5), ("use_gpu", True)]:
        with pytest.raises(ConfigError, match=key):  # refused before any shard is touched (no GPU needed)
            job.run(src, out, "preset:tiny", _cfg(**{key: value}), backend="local", progress=False)
    items, _ = sources.list_inputs(src)
    spec = resolve_vae("preset:tiny")
    assert spec.dtype == "float32"
    half = job.fingerprint(items, _cfg(), dataclasses.replace(spec, dtype="float16"))
    assert {k for k in half if half[k] != job.fingerprint(items, _cfg(), spec)[k]} == {"vae_dtype"}
    # audio shards do not depend on how a VAE would run: a rerun with another batch size resumes
    audio_out = str(tmp_path / "audio")
    job.run(src, audio_out, "none", _cfg(), backend="local", progress=False)
    assert job.run(src, audio_out, "none", _cfg(batch_size=1), backend="local", progress=False)["shards_skipped"] == 1


def test_audio_shards_and_augmented_copies(tmp_path):
    write_clips(tmp_path / "src", 3, seconds=1.5)
    out = str(tmp_path / "out")
    cfg = _cfg(
        samples_per_shard=4,
        augment={"copies": 1, "seed": 7, "chain": [{"name": "Gain", "min_gain_db": -3, "max_gain_db": 3, "p": 1}]},
    )
    summary = job.run(str(tmp_path / "src"), out, "none", cfg, backend="local", progress=False)
    # 4 samples per shard with 1 copy → 2 inputs per shard; each 1.5-1.7 s clip → 2 one-second segments × 2 copies
    assert summary["shards"] == 2 and summary["samples"] == 12
    index = shards.read_index(out)
    assert index["vae_id"] == "none" and index["latent_channels"] == 2 and index["latent_rate"] == 44100.0
    per_shard = [[s for s in shards.read_shard(uri)] for uri in shards.shard_uris(out)]
    for samples in per_shard:  # an input's segments and copies never leave its shard
        sources = {s.meta["source_uri"] for s in samples}
        assert all(sum(s.meta["source_uri"] == u for s in samples) == 4 for u in sources)
    samples = [s for shard in per_shard for s in shard]
    assert len({s.key for s in samples}) == 12
    for s in samples:
        audio, rate = sf.read(io.BytesIO(s.flac), dtype="float32")
        assert rate == 44100 and audio.shape[1] == 2
        assert audio.shape[0] == round(s.meta["segment_seconds"] * 44100)
        aug = s.meta["augmentation"]
        assert (aug is None) == (not s.key.endswith("_a1"))
        if aug is not None:
            assert aug["copy"] == 1 and aug["transforms"][0]["name"] == "Gain" and "amplitude_ratio" in json.dumps(aug)
    assert shards.verify(out).ok
    # reruns make the same variants, byte for byte
    out2 = str(tmp_path / "out2")
    job.run(str(tmp_path / "src"), out2, "none", cfg, backend="local", progress=False)
    assert [s["sha256"] for s in shards.read_index(out2)["shards"]] == [s["sha256"] for s in index["shards"]]


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    write_clips(tmp_path / "src", 2, seconds=0.3)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    monkeypatch.setattr(job, "BACKENDS", {**job.BACKENDS, "ray": job.run_local})  # no cluster needed here
    assert cli.main(["preprocess", src, out, "--vae", "preset:tiny", "max_seconds=-1"]) == 2  # overrides anywhere
    assert "max_seconds" in capsys.readouterr().err
    assert cli.main(["preprocess", src, out, "--vae", "preset:huge"]) == 2
    assert "--vae" in capsys.readouterr().err
    assert cli.main(["preprocess", str(tmp_path / "nope"), out, "--vae", "none"]) == 2
    assert cli.main(["preprocess", src, out, "samples_per_shard=1", "--vae", "preset:tiny"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 2 and summary["shards"] == 2 and summary["errors"] == 0

    def broken(plans, out, cfg, vae, on_result):
        for plan in plans:
            on_result(plan, None, RuntimeError("worker lost"))

    monkeypatch.setattr(job, "BACKENDS", {**job.BACKENDS, "ray": broken})
    out2 = str(tmp_path / "out2")
    assert cli.main(["preprocess", src, out2, "--vae", "preset:tiny"]) == 1
    assert "train-000000" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out2, "index.json"))


def test_cli_allow_outside_src_flag(tmp_path, monkeypatch, capsys):
    """Issue 15 item 6: a manifest row naming a file outside SRC is refused unless --allow-outside-src is given."""
    write_clips(tmp_path / "src", 1, seconds=0.3)
    write_clips(tmp_path / "elsewhere", 1, seconds=0.3)
    outside = str(tmp_path / "elsewhere" / "clip_000.wav")
    (tmp_path / "src" / "manifest.jsonl").write_text(json.dumps({"path": outside, "caption": "from elsewhere"}) + "\n")
    monkeypatch.setattr(job, "BACKENDS", {**job.BACKENDS, "ray": job.run_local})
    src = str(tmp_path / "src")
    refused, allowed = str(tmp_path / "refused"), str(tmp_path / "allowed")

    assert cli.main(["preprocess", src, refused, "--vae", "none"]) == 0
    assert [e["reason"].split(":")[0] for e in shards.read_errors(refused)] == ["outside-src"]
    assert all(s.meta["source_uri"] != outside for s in _samples(refused))

    assert cli.main(["preprocess", src, allowed, "--vae", "none", "--allow-outside-src"]) == 0
    assert shards.read_errors(allowed) == []
    assert [s.meta["caption"] for s in _samples(allowed) if s.meta["source_uri"] == outside] == ["from elsewhere"]


def test_latents_follow_the_source(tmp_path):
    expected = write_clips(tmp_path / "src", 2, seconds=2.3)
    out = str(tmp_path / "out")
    job.run(str(tmp_path / "src"), out, "preset:tiny", _cfg(), backend="local", progress=False)
    for s in _samples(out):
        exp = expected[s.meta["source_uri"].rsplit("/", 1)[-1]]
        offset, n = exp.segments(1.0)[int(s.key.rsplit("_", 1)[1])]
        assert s.latents.dtype == np.float16 and s.latents.shape == (64, -(-n // 1024))
        assert s.meta["offset_seconds"] == pytest.approx(offset) and s.meta["seconds_total"] == exp.seconds_total
        assert s.meta["source_sha256"] == exp.sha256 and s.meta["caption"].startswith("clip number")


def _wav(path: Path, frames: int, rate: int) -> None:
    sf.write(path, np.full((frames, 2), 0.1, np.float32), rate, subtype="PCM_16")


def test_hostile_inputs_each_end_in_errors_jsonl_and_the_job_succeeds(tmp_path, monkeypatch):
    """Issue 15: every input ends in exactly one shard or in errors.jsonl with its reason, and the job completes."""
    src = tmp_path / "src"
    write_clips(src, 2, seconds=0.3)
    _wav(src / "liar_1hz.wav", 100, 1)  # would upsample to 4.4 M samples
    _wav(src / "one_frame_96k.wav", 1, 96000)  # 0 samples at 44.1 kHz
    _wav(src / "deep.wav", 4410, 44100)
    (src / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json.loads
    _wav(src / "locked.wav", 4410, 44100)
    folder = tmp_path / "elsewhere" / "folder.wav"  # a manifest row naming a directory
    folder.mkdir(parents=True)
    (src / "manifest.jsonl").write_text(json.dumps({"path": str(folder), "caption": "a folder"}) + "\n")

    fetch = worker.fetch

    def locked(uri: str):  # tests run as root, where chmod 000 does not stop a read
        if uri.endswith("locked.wav"):
            raise PermissionError(13, "Permission denied", uri)
        return fetch(uri)

    monkeypatch.setattr(worker, "fetch", locked)
    out = str(tmp_path / "out")
    cfg = _cfg(samples_per_shard=16)
    summary = job.run(str(src), out, "preset:tiny", cfg, backend="local", progress=False, allow_outside_src=True)

    reasons = {e["source_uri"].rsplit("/", 1)[-1]: e["reason"] for e in shards.read_errors(out)}
    assert {name: reason.split(":")[0] for name, reason in reasons.items()} == {
        "liar_1hz.wav": "bad-header",
        "one_frame_96k.wav": "empty",
        "deep.wav": "caption",
        "locked.wav": "unreadable",
        "folder.wav": "unreadable",
    }
    assert "recursion" in reasons["deep.wav"]
    assert "PermissionError" in reasons["locked.wav"] and "IsADirectoryError" in reasons["folder.wav"]
    assert not any(str(tmp_path) in r for r in reasons.values())  # no local paths in errors.jsonl
    encoded = sorted({s.meta["source_uri"].rsplit("/", 1)[-1] for s in _samples(out)})
    assert encoded == ["clip_000.wav", "clip_001.wav"] and summary["errors"] == 5 and summary["inputs"] == 7
