"""The shard format, version 1 (SPEC §6): write, read, verify.

Layout under a preprocess OUT (local dir or s3:// prefix)::

    OUT/
      shards/train-000000.tar          KEY.latents.npy (float16 [C, T]) or KEY.flac, and KEY.json per sample
      shards/train-000000.stats.json   written after its tar: the done marker {samples, bytes, sha256}
      index.json                       format_version, vae_id, latent_channels, latent_rate, shards, errors, ...
      errors.jsonl                     one {"source_uri", "reason"} line per input that was not encoded

Tars are deterministic (sorted members in sample order, mtime 0, uid/gid 0) so a rerun of a shard produces the
same bytes and the same sha256. Member names are validated when read: a key must match ``[A-Za-z0-9_-]+`` and
an extension must be one we know, so a crafted tar cannot smuggle paths or unknown payloads.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from pipeline import storage

FORMAT_VERSION = 1
KEY_RE = re.compile(r"\A[A-Za-z0-9_-]+\Z")  # \Z, not $: "$" also matches before a final "\n"
SHARD_NAME_RE = re.compile(r"[a-z0-9]+-[0-9]{6,}")  # shard_name(): SPLIT-NNNNNN, SPLIT as PreprocessConfig.split
PAYLOADS = ("latents.npy", "flac")
REQUIRED_META = (
    "caption",
    "seconds_total",
    "offset_seconds",
    "source_uri",
    "source_sha256",
    "augmentation",
    "sample_rate",
    "latent_rate",
    "vae_id",
    "meta",
)


class ShardFormatError(ValueError):
    """A shard or index does not follow the format; the message names the shard and the member."""


@dataclass
class Sample:
    """One training example: metadata plus either latents ([C, T] float16) or FLAC bytes."""

    key: str
    meta: dict[str, Any]
    latents: np.ndarray | None = None
    flac: bytes | None = None

    @property
    def seconds(self) -> float:
        """Length of this segment in seconds (from the latents and the latent rate)."""
        if self.latents is not None:
            return self.latents.shape[-1] / float(self.meta["latent_rate"])
        return float(self.meta.get("segment_seconds", 0.0))


@dataclass
class ShardStats:
    name: str
    samples: int
    bytes: int
    sha256: str
    seconds: float = 0.0
    # inputs of this shard that were not encoded ({"source_uri", "reason"}); kept in the marker so a rerun that
    # skips the shard still reports them in errors.jsonl
    errors: list[dict[str, str]] = field(default_factory=list)

    def index_entry(self) -> dict[str, Any]:
        """The shard's entry in index.json (the errors go to errors.jsonl instead)."""
        return {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "seconds": self.seconds,
        }


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------------------------------------- names
def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


def tar_uri(out: str, name: str) -> str:
    return storage.join(out, "shards", f"{name}.tar")


def stats_uri(out: str, name: str) -> str:
    return storage.join(out, "shards", f"{name}.stats.json")


def is_done(out: str, name: str) -> bool:
    """A shard is done when its stats marker exists (it is written only after the tar is complete)."""
    return storage.exists(stats_uri(out, name))


# ----------------------------------------------------------------------------------------------- encode
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


class _Digest:
    """A write-only file that passes bytes on and keeps their sha256 and count (tarfile needs write and tell)."""

    def __init__(self, out: IO[bytes]):
        self.out, self.sha256, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def write_tar(samples: Iterable[Sample], out: IO[bytes]) -> None:
    """Serialise samples as a deterministic tar into ``out`` (payload then json per sample), one member at a time."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if not KEY_RE.fullmatch(sample.key):
                raise ShardFormatError(f"sample key {sample.key!r} does not match {KEY_RE.pattern}")
            if sample.latents is not None:
                _add(tar, f"{sample.key}.latents.npy", npy_bytes(sample.latents.astype(np.float16)))
            elif sample.flac is not None:
                _add(tar, f"{sample.key}.flac", sample.flac)
            else:
                raise ShardFormatError(f"sample {sample.key} has neither latents nor flac")
            meta = json.dumps(sample.meta, sort_keys=True, allow_nan=False).encode()
            _add(tar, f"{sample.key}.json", meta)


def build_tar(samples: Iterable[Sample]) -> bytes:
    """The tar of :func:`write_tar` as bytes (small shards, tests)."""
    buf = io.BytesIO()
    write_tar(samples, buf)
    return buf.getvalue()


def write_shard(out: str, name: str, samples: list[Sample], errors: list[dict[str, str]] | None = None) -> ShardStats:
    """Upload the tar, then its stats marker: a crash in between leaves no marker, so the shard is redone.

    The tar streams to a temp file (an audio shard of 256 x 95 s is gigabytes: the samples' payloads are its only
    copy in memory). ``errors`` (inputs of this shard that were not encoded) are recorded in the marker."""
    with storage.open_write(tar_uri(out, name)) as file:
        digest = _Digest(file)
        write_tar(samples, digest)
    stats = ShardStats(
        name=name,
        samples=len(samples),
        bytes=digest.size,
        sha256=digest.sha256.hexdigest(),
        seconds=round(sum(s.seconds for s in samples), 3),
        errors=list(errors or []),
    )
    storage.write_text(stats_uri(out, name), json.dumps(stats.__dict__, sort_keys=True))
    return stats


def read_stats(out: str, name: str) -> ShardStats:
    return ShardStats(**json.loads(storage.read_text(stats_uri(out, name))))


# ----------------------------------------------------------------------------------------------- read
def _split_member(name: str, where: str) -> tuple[str, str]:
    key, dot, ext = name.partition(".")
    if not dot or "/" in name or not KEY_RE.fullmatch(key) or ext not in (*PAYLOADS, "json"):
        raise ShardFormatError(f"{where}: unexpected member {name!r}")
    return key, ext


def iter_tar(data: bytes, where: str = "shard") -> Iterator[Sample]:
    """Samples of a tar held in memory, in order, with member names validated."""
    current: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ShardFormatError(f"{where}: member {member.name!r} is not a regular file")
            key, ext = _split_member(member.name, where)
            if current and current["key"] != key:
                yield _finish(current, where)
                current = {}
            current["key"] = key
            current[ext] = tar.extractfile(member).read()
    if current:
        yield _finish(current, where)


def _finish(parts: dict[str, Any], where: str) -> Sample:
    key = parts["key"]
    if "json" not in parts:
        raise ShardFormatError(f"{where}: sample {key} has no json")
    meta = json.loads(parts["json"])
    latents = npy_load(parts["latents.npy"]) if "latents.npy" in parts else None
    return Sample(key=key, meta=meta, latents=latents, flac=parts.get("flac"))


def read_shard(uri: str) -> Iterator[Sample]:
    yield from iter_tar(storage.read_bytes(uri), where=uri)


# ----------------------------------------------------------------------------------------------- index
def write_index(
    out: str,
    *,
    vae_id: str,
    vae_config_hash: str,
    latent_channels: int,
    latent_rate: float,
    shards: list[ShardStats],
    errors: list[dict[str, str]],
    only_if_changed: bool = False,
) -> dict[str, Any]:
    """Write ``errors.jsonl`` then ``index.json`` (the index last: its presence means the job finished).

    With ``only_if_changed`` a file whose stored bytes are already the new ones is not uploaded again (a rerun of a
    finished job then writes nothing)."""
    errors_text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors)
    _write_text_if(storage.join(out, "errors.jsonl"), errors_text, only_if_changed)
    index = {
        "format_version": FORMAT_VERSION,
        "vae_id": vae_id,
        "vae_config_hash": vae_config_hash,
        "latent_channels": latent_channels,
        "latent_rate": latent_rate,
        "shards": [s.index_entry() for s in sorted(shards, key=lambda s: s.name)],
        "total_hours": round(sum(s.seconds for s in shards) / 3600.0, 6),
        "errors": {"count": len(errors), "by_reason": dict(Counter(e["reason"].split(":")[0] for e in errors))},
    }
    _write_text_if(storage.join(out, "index.json"), json.dumps(index, indent=2, sort_keys=True), only_if_changed)
    return index


def _write_text_if(uri: str, text: str, only_if_changed: bool) -> None:
    if only_if_changed:
        try:
            if storage.read_text(uri) == text:
                return
        except FileNotFoundError:
            pass
    storage.write_text(uri, text)


def read_index(out: str) -> dict[str, Any]:
    """index.json, with its shard names validated: they become paths (``OUT/shards/NAME.tar``) in every reader, so a
    crafted name such as ``../../x`` must not get that far."""
    index = json.loads(storage.read_text(storage.join(out, "index.json")))
    if index.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{out}/index.json: format_version {index.get('format_version')} is not 1")
    for entry in index.get("shards", []):
        name = entry.get("name") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not SHARD_NAME_RE.fullmatch(name):
            raise ShardFormatError(f"{out}/index.json: shard name {name!r} is not SPLIT-NNNNNN")
    return index


def read_errors(out: str) -> list[dict[str, str]]:
    text = storage.read_text(storage.join(out, "errors.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def index_hash(out: str) -> str:
    """sha256 of index.json: the tag that ties a training run to its exact data."""
    return hashlib.sha256(storage.read_bytes(storage.join(out, "index.json"))).hexdigest()


def shard_uris(out: str, split: str | None = None) -> list[str]:
    """Tar URIs listed in the index (optionally one split), sorted."""
    names = [s["name"] for s in read_index(out)["shards"]]
    return [tar_uri(out, n) for n in sorted(names) if split is None or n.rsplit("-", 1)[0] == split]


# ----------------------------------------------------------------------------------------------- verify
def verify(out: str) -> VerifyReport:
    """Full integrity check: every tar's bytes, checksum, sample count and every sample's payload and metadata."""
    report = VerifyReport()
    index = read_index(out)
    channels = index["latent_channels"]
    keys: set[str] = set()
    for entry in index["shards"]:
        name = entry["name"]
        report.shards += 1
        try:
            data = storage.read_bytes(tar_uri(out, name))
            marker = read_stats(out, name)
        except FileNotFoundError as exc:
            report.problems.append(f"{name}: missing {exc}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"] or digest != marker.sha256 or len(data) != entry["bytes"]:
            report.problems.append(f"{name}: checksum or size does not match index/stats")
        count = 0
        try:
            for sample in iter_tar(data, where=name):
                count += 1
                report.problems += _check_sample(name, sample, channels, keys)
        except (ShardFormatError, tarfile.TarError, ValueError) as exc:
            report.problems.append(f"{name}: {exc}")
        if count != entry["samples"] or count != marker.samples:
            report.problems.append(f"{name}: {count} samples, index says {entry['samples']}")
        report.samples += count
    return report


def _check_sample(shard: str, sample: Sample, channels: int, keys: set[str]) -> list[str]:
    problems = []
    where = f"{shard}/{sample.key}"
    if sample.key in keys:
        problems.append(f"{where}: duplicate key")
    keys.add(sample.key)
    missing = [k for k in REQUIRED_META if k not in sample.meta]
    if missing:
        problems.append(f"{where}: json lacks {', '.join(missing)}")
    if sample.latents is not None:
        arr = sample.latents
        if arr.dtype != np.float16 or arr.ndim != 2 or arr.shape[0] != channels:
            problems.append(f"{where}: latents {arr.dtype} {arr.shape}, expected float16 [{channels}, T]")
        elif not np.isfinite(arr).all():
            problems.append(f"{where}: latents contain NaN/inf")
    return problems


def inspect(out: str) -> dict[str, Any]:
    """A summary of an output (from the index; no tar is read)."""
    index = read_index(out)
    return {
        "out": out,
        "format_version": index["format_version"],
        "vae_id": index["vae_id"],
        "latent_channels": index["latent_channels"],
        "latent_rate": index["latent_rate"],
        "shards": len(index["shards"]),
        "samples": sum(s["samples"] for s in index["shards"]),
        "bytes": sum(s["bytes"] for s in index["shards"]),
        "total_hours": index["total_hours"],
        "errors": index["errors"],
    }
