"""The shard format: deterministic tars, markers, index, verification that catches corruption."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from pipeline import shards, storage


def _sample(i: int, channels: int = 4) -> shards.Sample:
    meta = {
        "caption": f"piece {i}",
        "seconds_total": 3,
        "offset_seconds": 0.0,
        "source_uri": f"/data/{i}.wav",
        "source_sha256": "0" * 64,
        "augmentation": None,
        "sample_rate": 44100,
        "latent_rate": 44100 / 1024,
        "vae_id": "preset:tiny",
        "meta": {"composer": "bach"},
    }
    latents = np.random.default_rng(i).standard_normal((channels, 10 + i)).astype(np.float16)
    return shards.Sample(key=f"s{i:04d}", meta=meta, latents=latents)


def _write_out(out: str) -> list[shards.ShardStats]:
    stats = [
        shards.write_shard(out, shards.shard_name("train", n), [_sample(n * 3 + j) for j in range(3)]) for n in (0, 1)
    ]
    shards.write_index(
        out,
        vae_id="preset:tiny",
        vae_config_hash="abc",
        latent_channels=4,
        latent_rate=44100 / 1024,
        shards=stats,
        errors=[{"source_uri": "/data/bad.wav", "reason": "decode: not audio"}],
    )
    return stats


def test_tars_are_deterministic_and_round_trip():
    samples = [_sample(i) for i in range(3)]
    assert shards.build_tar(samples) == shards.build_tar(samples)
    back = list(shards.iter_tar(shards.build_tar(samples)))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back, strict=True):
        assert b.latents.dtype == np.float16
        np.testing.assert_array_equal(a.latents, b.latents)
        assert a.meta == b.meta


def test_index_verify_inspect(tmp_path):
    out = str(tmp_path / "out")
    stats = _write_out(out)
    assert all(shards.is_done(out, s.name) for s in stats)
    summary = shards.inspect(out)
    assert summary["shards"] == 2 and summary["samples"] == 6
    assert summary["errors"] == {"count": 1, "by_reason": {"decode": 1}}
    assert shards.read_errors(out) == [{"source_uri": "/data/bad.wav", "reason": "decode: not audio"}]
    report = shards.verify(out)
    assert report.ok and report.samples == 6
    cli = subprocess.run([sys.executable, "-m", "infra.cli", "shards", "verify", out], capture_output=True, text=True)
    assert cli.returncode == 0 and json.loads(cli.stdout) == {"ok": True, "shards": 2, "samples": 6}


def test_verify_catches_a_flipped_byte(tmp_path):
    out = str(tmp_path / "out")
    stats = _write_out(out)
    path = shards.tar_uri(out, stats[1].name)
    data = bytearray(storage.read_bytes(path))
    data[700] ^= 0xFF
    storage.write_bytes(path, bytes(data))
    report = shards.verify(out)
    assert not report.ok and any(stats[1].name in p for p in report.problems)
    cli = subprocess.run([sys.executable, "-m", "infra.cli", "shards", "verify", out], capture_output=True, text=True)
    assert cli.returncode == 1


def test_write_shard_streams_the_tar_and_keeps_its_bytes(tmp_path, monkeypatch):
    """Issue 15 item 5: the tar goes to a file as it is built, never whole into memory, and its bytes are the ones
    the in-memory writer made before (the sha256 below was computed with it, so resumed outputs stay valid)."""

    def held(*_args, **_kwargs):
        raise AssertionError("the whole tar was built in memory")

    write_bytes = storage.write_bytes

    def no_tar_bytes(uri, data):
        assert not str(uri).endswith(".tar"), "the whole tar was uploaded from memory"
        write_bytes(uri, data)

    monkeypatch.setattr(shards, "build_tar", held)
    monkeypatch.setattr(storage, "write_bytes", no_tar_bytes)
    samples = [_sample(i) for i in range(3)]
    samples.append(shards.Sample(key="f0000", meta=dict(samples[0].meta), flac=b"fLaC" + bytes(range(256)) * 4000))
    stats = shards.write_shard(str(tmp_path), "train-000000", samples, [{"source_uri": "/x.wav", "reason": "empty:"}])
    golden = "be2625d97ed78f3d1baad9152994c4863ee49de68c55ffe3a76548e8bf155091"
    data = (tmp_path / "shards" / "train-000000.tar").read_bytes()
    assert stats.sha256 == hashlib.sha256(data).hexdigest() == golden and stats.bytes == len(data) == 1034240
    assert [s.key for s in shards.read_shard(shards.tar_uri(str(tmp_path), "train-000000"))] == [
        "s0000",
        "s0001",
        "s0002",
        "f0000",
    ]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["train-000000.stats.json", "train-000000.tar"]


@pytest.mark.parametrize("name", ["../evil.json", "a/b.json", "k.exe", "bad key.json"])
def test_member_names_are_validated_when_read(name):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(shards.ShardFormatError):
        list(shards.iter_tar(buf.getvalue()))


@pytest.mark.parametrize("key", ["has space", "s0001\n", "\ns0001", ""])
def test_keys_are_validated_when_written(key):
    bad = _sample(0)
    bad.key = key
    with pytest.raises(shards.ShardFormatError):
        shards.build_tar([bad])


def test_a_key_with_a_trailing_newline_is_refused_when_read():
    """KEY_RE must not take a key that ends in a newline ("$" matches before one): its members are refused."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("s0001\n.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(shards.ShardFormatError, match="unexpected member"):
        list(shards.iter_tar(buf.getvalue()))
    assert shards.KEY_RE.match("s0001\n") is None and shards.KEY_RE.match("s0001_a1")
