"""Inputs of a preprocess job: which audio files, their captions, and which shard each one goes to.

The driver lists SRC once (a local directory or an s3:// prefix), attaches captions from a manifest
(``.jsonl``/``.csv``/``.parquet`` with ``path``, ``caption`` and extra columns kept as ``meta``) or names the
sidecars (``NAME.txt`` / ``NAME.json``) for the worker to read, sorts the inputs by URI and cuts the sorted list
into shards. The same listing always gives the same plan, which is what makes reruns skip and never duplicate.

Each input becomes ``inputs_per_shard = samples_per_shard // (1 + copies)`` of a shard, so a shard of files
shorter than ``max_seconds`` holds about ``samples_per_shard`` samples; an input's segments and augmented copies
always stay in its shard.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.shards import shard_name

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv", "manifest.parquet")


class SourceError(ConfigError):
    """SRC or the manifest cannot be used at all (the job stops with exit 2, naming the file)."""


@dataclass
class InputItem:
    """One audio file to encode. ``caption``/``meta`` come from the manifest, or from a sidecar the worker reads."""

    uri: str
    key: str  # sample-key stem, unique within the job: matches [A-Za-z0-9_-]+
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    sidecar: str | None = None  # URI of NAME.json or NAME.txt, read by the worker


@dataclass
class ShardPlan:
    name: str  # e.g. "train-000003"
    inputs: list[InputItem]


# ----------------------------------------------------------------------------------------------- keys
def _rel(src: str, uri: str) -> str:
    prefix = src.rstrip("/") + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri


def input_key(rel_path: str) -> str:
    """A readable, stable key stem: the file stem made safe, plus a hash of the relative path for uniqueness."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", PurePosixPath(rel_path).stem).strip("_")[:40] or "audio"
    return f"{stem}-{hashlib.sha1(rel_path.encode()).hexdigest()[:12]}"


# ----------------------------------------------------------------------------------------------- manifest
def _json_safe(value: Any) -> Any:
    """Manifest cells as JSON values: numpy scalars become Python ones, NaN/inf become null."""
    if hasattr(value, "item") and not isinstance(value, list | dict | str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def read_manifest(uri: str) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` / ``.csv`` / ``.parquet`` manifest; each must have ``path`` (and usually ``caption``)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise SourceError(f"--manifest: {uri} does not exist") from None
    try:
        if uri.endswith(".jsonl"):
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        elif uri.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
        elif uri.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        else:
            raise SourceError(f"--manifest: {uri} must end in .jsonl, .csv or .parquet")
        rows = [_json_safe(row) for row in rows]
    except (ValueError, UnicodeDecodeError, OSError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"--manifest: {uri} cannot be parsed ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("path"):
            raise SourceError(f"--manifest: {uri} row {i + 1} has no 'path'")
    return rows


def find_manifest(src: str) -> str | None:
    """``manifest.jsonl/.csv/.parquet`` at SRC's root, if there is one."""
    for name in MANIFEST_NAMES:
        uri = storage.join(src, name)
        if storage.exists(uri):
            return uri
    return None


# ----------------------------------------------------------------------------------------------- listing
def _inside(src: str, uri: str) -> bool:
    """Whether ``uri`` lies under ``src``: no other root, and no ``..`` left in it (S3 keys keep it literally)."""
    prefix = src + "/"
    return uri.startswith(prefix) and ".." not in uri[len(prefix) :].split("/")


def list_inputs(
    src: str, manifest: str | None = None, allow_outside_src: bool = False
) -> tuple[list[InputItem], list[dict[str, str]]]:
    """Sorted inputs under ``src`` with their captions, plus error records for manifest rows with no file.

    Without ``manifest``, a manifest at SRC's root is used if present, else sidecars. Audio files the manifest does
    not mention keep caption "" (and can still train the VAE); the worker reads sidecars for them if they exist.
    Manifest rows naming a file outside SRC (``../x``, an absolute path, another bucket) are refused with an
    ``outside-src`` error unless ``allow_outside_src``: a manifest is data, and must not choose what the job reads.
    """
    src = src.rstrip("/") if storage.is_s3(src) else os.path.normpath(src)
    if not storage.is_s3(src) and not os.path.isdir(src):
        raise SourceError(f"src: {src} is not a directory")
    listed = list(storage.list_uris(src))
    present = set(listed)
    uris = {u for u in listed if u.lower().endswith(AUDIO_EXTENSIONS)}
    manifest = manifest or find_manifest(src)
    rows: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, str]] = []
    if manifest:
        for row in read_manifest(manifest):
            path = str(row["path"])
            uri = path if storage.is_s3(path) or os.path.isabs(path) else storage.join(src, posixpath.normpath(path))
            uri = uri if storage.is_s3(uri) else os.path.normpath(uri)
            inside = _inside(src, uri)
            if not inside and not allow_outside_src:
                errors.append({"source_uri": uri, "reason": "outside-src: the manifest names a file outside SRC"})
                continue
            rows[uri] = row
            if uri in present or (not inside and storage.exists(uri)):
                uris.add(uri)
            else:
                errors.append({"source_uri": uri, "reason": "missing: listed in the manifest, no such file"})
    items = []
    for uri in sorted(uris):
        rel = _rel(src, uri)
        row = rows.get(uri)
        item = InputItem(uri=uri, key=input_key(rel))
        if row is not None:
            item.caption = str(row.get("caption") or "")
            item.meta = {k: v for k, v in row.items() if k not in ("path", "caption")}
        else:
            stem = uri[: -len(PurePosixPath(uri).suffix)]
            item.sidecar = next((s for s in (stem + ".json", stem + ".txt") if s in present), None)
        items.append(item)
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):  # 48-bit path hashes: only a crafted listing gets here
        raise SourceError(f"src: two inputs map to the same sample key under {src}")
    return items, errors


def plan_shards(items: list[InputItem], inputs_per_shard: int, split: str) -> list[ShardPlan]:
    """Cut the sorted input list into shards: input i goes to shard ``i // inputs_per_shard``."""
    return [
        ShardPlan(name=shard_name(split, n), inputs=items[start : start + inputs_per_shard])
        for n, start in enumerate(range(0, len(items), inputs_per_shard))
    ]


# ----------------------------------------------------------------------------------------------- fetching
@contextmanager
def fetch(uri: str) -> Iterator[tuple[str, str, int]]:
    """A local path for ``uri`` (s3:// objects are streamed to a temp file), its sha256 and its size in bytes."""
    digest = hashlib.sha256()
    if not storage.is_s3(uri):
        with open(uri, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        yield uri, digest.hexdigest(), os.path.getsize(uri)
        return
    suffix = PurePosixPath(uri).suffix
    with tempfile.NamedTemporaryFile(prefix="longplay-src-", suffix=suffix) as tmp:
        size = 0
        with storage.open_read(uri) as body:
            for block in iter(lambda: body.read(1 << 20), b""):
                digest.update(block)
                tmp.write(block)
                size += len(block)
        tmp.flush()
        yield tmp.name, digest.hexdigest(), size


def read_sidecar(uri: str) -> tuple[str, dict[str, Any]]:
    """``NAME.txt`` → (its text, {}); ``NAME.json`` → (its ``caption``, the other keys as meta)."""
    text = storage.read_text(uri)
    if uri.endswith(".txt"):
        return text.strip(), {}
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("sidecar json is not an object")
    data = _json_safe(data)
    return str(data.pop("caption", "") or ""), data
