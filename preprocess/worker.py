"""One shard, start to finish: fetch → decode → augment → encode → tar → upload → marker.

:class:`ShardWorker` holds the VAE and processes whole shards, so the unit of work, of retry and of output are
the same thing: if the process dies, the shard's retry rebuilds the same samples in the same order and overwrites
the same tar (uploads are atomic) before writing the marker; a shard without a marker was never finished, and one
with a marker is never written again. The class knows nothing about Ray; ``preprocess.job`` runs it either in
process or as a pool of Ray actors.

Inside a shard, the next inputs are fetched and decoded on a thread while the current batch is encoded, and
pieces (segments and augmented copies) are batched across inputs until ``batch_size`` is reached.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import allocator, components, shards
from pipeline.config import PreprocessConfig
from preprocess import audio, augment
from preprocess.encode import VaeSpec, check_loaded, encode
from preprocess.sources import InputItem, ShardPlan, fetch, read_sidecar

log = logging.getLogger(__name__)

PREFETCH = 2  # inputs decoded ahead of the encoder


@dataclass
class ShardResult:
    stats: shards.ShardStats
    inputs: int
    audio_seconds: float  # of 44.1 kHz audio encoded in this call (0 when the shard was already done)
    skipped: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per stage (see ShardWorker.process)
    # The job's timeline (wall-clock Unix times, so comparable across the processes of one machine): which worker
    # ran the shard ("host:pid"), when that worker had loaded its VAE, and when the shard started and finished.
    worker: str = ""
    worker_ready_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0


@dataclass
class _Loaded:
    """An input after fetch + decode, or the reason it failed."""

    item: InputItem
    sha256: str = ""
    caption: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    decoded: audio.Decoded | None = None
    fetch_seconds: float = 0.0  # on the decode thread: download (or open) + sha256
    decode_seconds: float = 0.0  # on the decode thread: decode + resample
    error: str | None = None


@dataclass
class _Piece:
    """One sample to be: a segment of an input, original (copy 0) or augmented, and once encoded what it became."""

    source: _Loaded  # the input it was cut from (a later error there, e.g. NaN latents, drops the piece)
    segment: int
    copy: int
    offset_seconds: float
    audio: np.ndarray | None  # (2, n) float32 @ 44.1 kHz; dropped once encoded
    augmentation: dict[str, Any] | None
    samples: int = 0  # n
    latents: np.ndarray | None = None  # (C, T) float16, with a VAE
    flac: bytes | None = None  # audio shards (--vae none)

    def __post_init__(self) -> None:
        self.samples = self.audio.shape[-1]


# Failures that belong to one file and that no retry can cure: recorded in errors.jsonl, the shard goes on. Storage
# failures (S3 down, credentials) are not among them: they fail the shard so that a rerun redoes it.
UNREADABLE = (PermissionError, IsADirectoryError, NotADirectoryError)
# RecursionError: JSON nested deeper than Python's recursion limit (json.loads and _json_safe both recurse)
BAD_SIDECAR = (ValueError, UnicodeDecodeError, RecursionError, FileNotFoundError, *UNREADABLE)


def _oserror_reason(exc: OSError) -> str:
    # strerror, not str(exc): the latter holds a local (possibly temporary) path
    return f"{type(exc).__name__} ({exc.strerror or exc})"


def load_input(item: InputItem, max_input_seconds: float) -> _Loaded:
    """Fetch, hash, read the caption, decode. A bad file or sidecar is recorded in ``error``; storage failures raise."""
    loaded = _Loaded(item=item, caption=item.caption or "", meta=dict(item.meta))
    if item.sidecar:
        try:
            loaded.caption, loaded.meta = read_sidecar(item.sidecar)
        except BAD_SIDECAR as exc:
            detail = _oserror_reason(exc) if isinstance(exc, OSError) else str(exc)
            loaded.error = f"caption: sidecar {item.sidecar.rsplit('/', 1)[-1]} is unreadable ({detail})"
            return loaded
    try:
        started = time.perf_counter()
        with fetch(item.uri) as (path, sha256, _):
            loaded.sha256 = sha256
            fetched = time.perf_counter()
            loaded.fetch_seconds = fetched - started
            loaded.decoded = audio.decode(path, max_input_seconds)
            loaded.decode_seconds = time.perf_counter() - fetched
    except FileNotFoundError:
        loaded.error = "missing: the file disappeared after listing"
    except UNREADABLE as exc:  # e.g. a manifest row naming a directory, a file we may not read
        loaded.error = f"unreadable: {_oserror_reason(exc)}"
    except audio.AudioError as exc:
        loaded.error = exc.reason
    return loaded


class ShardWorker:
    """Holds the VAE and the augmentation chain; :meth:`process` turns a :class:`ShardPlan` into a written shard."""

    def __init__(self, out: str, config: dict[str, Any], vae: VaeSpec, device: str = "cpu"):
        allocator.tune()  # keep freed tensor buffers in the heap (pipeline/allocator.py): ~1.7x the encoder's speed
        self.out = out
        self.cfg = PreprocessConfig.model_validate(config)
        self.vae = vae
        self.device = device
        self.model = None if vae.audio_only else components.load_vae(vae.uri, device)
        check_loaded(self.model, vae)
        self.chain = augment.build_chain(self.cfg.augment.chain)
        self.copies = self.cfg.augment.copies if self.chain is not None else 0
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.ready_at = time.time()

    # ------------------------------------------------------------------ the shard
    def process(self, plan: ShardPlan) -> ShardResult:
        """Write the shard ``plan`` names. ``ShardResult.seconds`` says where its wall time went: ``wait`` (for the
        decode thread), ``segment_augment``, ``encode``, ``write`` (tar + upload + marker) and ``total`` on this
        thread; ``fetch`` and ``decode`` are the decode thread's own time, which overlaps the others."""
        started, started_at = time.perf_counter(), time.time()
        timings: dict[str, float] = dict.fromkeys(("wait", "segment_augment", "encode", "write"), 0.0)
        timeline = {"worker": self.name, "worker_ready_at": self.ready_at, "started_at": started_at}

        @contextmanager
        def timed(stage: str) -> Iterator[None]:
            t0 = time.perf_counter()
            yield
            timings[stage] += time.perf_counter() - t0

        if shards.is_done(self.out, plan.name):  # a retry racing a finished attempt: never write a shard twice
            stats = shards.read_stats(self.out, plan.name)
            return ShardResult(stats, len(plan.inputs), 0.0, skipped=True, **timeline, finished_at=time.time())
        loaded: list[_Loaded] = []  # every input, in plan order
        pieces: list[_Piece] = []  # every piece, in sample order; pieces[encoded:] wait for a full batch
        encoded = 0
        for item in self._prefetch(plan.inputs, timings):
            loaded.append(item)
            if item.error is None:
                try:
                    with timed("segment_augment"):
                        new = self._pieces(item)
                except audio.AudioError as exc:
                    item.error = exc.reason
                    continue
                if not new:  # decode refuses 0-sample audio; this keeps "a shard or an error line" true regardless
                    item.error = "empty: no samples"
                    continue
                pieces += new
                if len(pieces) - encoded >= self.cfg.batch_size:
                    with timed("encode"):
                        self._encode(pieces[encoded:])
                    encoded = len(pieces)
        with timed("encode"):
            self._encode(pieces[encoded:])

        errors = [{"source_uri": item.item.uri, "reason": item.error} for item in loaded if item.error is not None]
        kept = [piece for piece in pieces if piece.source.error is None]
        with timed("write"):
            samples = [self._sample(piece) for piece in kept]
            stats = shards.write_shard(self.out, plan.name, samples, errors)
        seconds = sum(piece.samples / audio.SAMPLE_RATE for piece in kept)
        timings["fetch"] = sum(item.fetch_seconds for item in loaded)
        timings["decode"] = sum(item.decode_seconds for item in loaded)
        timings["total"] = time.perf_counter() - started
        return ShardResult(stats, len(plan.inputs), seconds, seconds=timings, **timeline, finished_at=time.time())

    def _prefetch(self, items: list[InputItem], timings: dict[str, float]) -> Iterator[_Loaded]:
        """The inputs fetched and decoded on a thread, in order; ``timings["wait"]`` adds the time spent waiting."""

        def ready(future: Future) -> _Loaded:
            started = time.perf_counter()
            loaded = future.result()
            timings["wait"] += time.perf_counter() - started
            return loaded

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
            futures: list[Future] = []
            for item in items:
                futures.append(pool.submit(load_input, item, self.cfg.max_input_seconds))
                if len(futures) > PREFETCH:
                    yield ready(futures.pop(0))
            for future in futures:
                yield ready(future)

    def _pieces(self, item: _Loaded) -> list[_Piece]:
        """The segments of one input, then each augmented copy of them: input order, segment, copy."""
        segments = audio.segments(item.decoded.audio, self.cfg.max_seconds)
        out = []
        for seg in segments:
            out.append(_Piece(item, seg.index, 0, seg.offset_seconds, seg.audio, None))
            for copy in range(1, self.copies + 1):
                seed = augment.copy_seed(self.cfg.augment.seed, item.sha256, copy)
                try:
                    augmented, applied = augment.apply(self.chain, seg.audio, seed)
                except Exception as exc:  # a transform that cannot handle this input (e.g. too short)
                    raise audio.AudioError(f"augment: {type(exc).__name__}: {exc}") from None
                if not np.isfinite(augmented).all():
                    raise audio.AudioError(f"augment: copy {copy} produced NaN or inf")
                record = augment.record(seed, copy, applied)
                out.append(_Piece(item, seg.index, copy, seg.offset_seconds, augmented, record))
        item.decoded.audio = None  # the pieces hold what is still needed
        return out

    def _encode(self, pending: list[_Piece]) -> None:
        """Each piece's latents (or FLAC for audio shards) onto the piece; its audio is dropped."""
        if not pending:
            return
        if self.model is None:
            for p in pending:
                p.flac, p.audio = audio.flac_bytes(p.audio), None
            return
        encoded = encode(
            self.model, [p.audio for p in pending], self.cfg.batch_size, self.cfg.chunk_seconds, self.device
        )
        for p, z in zip(pending, encoded, strict=True):
            if not np.isfinite(z).all():
                p.source.error = "nonfinite: the VAE produced NaN or inf latents (float16 overflow?)"
            p.latents, p.audio = z, None

    def _sample(self, piece: _Piece) -> shards.Sample:
        item = piece.source
        key = f"{item.item.key}_{piece.segment:04d}" + (f"_a{piece.copy}" if piece.copy else "")
        meta = {
            "caption": item.caption,
            "seconds_total": item.decoded.seconds_total,
            "offset_seconds": round(piece.offset_seconds, 6),
            "segment_seconds": round(piece.samples / audio.SAMPLE_RATE, 6),
            "source_uri": item.item.uri,
            "source_sha256": item.sha256,
            "augmentation": piece.augmentation,
            "sample_rate": audio.SAMPLE_RATE,
            "latent_rate": self.vae.latent_rate,
            "vae_id": self.vae.vae_id,
            "meta": item.meta,
        }
        if self.model is None:
            return shards.Sample(key=key, meta=meta, flac=piece.flac)
        return shards.Sample(key=key, meta=meta, latents=piece.latents)
