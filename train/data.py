"""Streaming training data: tar shards (local or s3://) → WebDataset's shuffle buffer → random crops with Stable
Audio's timing.

Each (rank, DataLoader worker) pair is one *slot*; slot ``i`` of ``N`` reads shards ``urls[i::N]`` (or, when there are
fewer shards than slots, one shard chosen by ``i mod len(urls)``, so no slot is ever empty). The per-slot stream
cycles over its shards forever, reshuffled each pass from a seed, so step-based training on uneven shard counts never
waits for a rank that ran out of data::

    shards ──split by slot──> slot's shards ──cycle, seeded shuffle──> tar samples ──seeded buffer──> crops

A crop of ``W`` latent frames starts at a uniformly random frame ``s`` of a segment of ``T`` frames; the timing it
carries is the paper's (``seconds_start`` is the crop's offset within its *source file*)::

    source file   |==================== seconds_total = ceil(duration) ====================|
    segment                 |<- offset_seconds ->|============ T frames ============|
    crop                                         |<- s frames ->|==== W frames ====|
    seconds_start = floor(offset_seconds + s / latent_rate)

A segment shorter than the window is placed at frame 0 and padded with the VAE's latent of *silence* (not zeros:
zeros decode to a buzz), and ``mask`` marks the real frames so losses can ignore the padding.

Broken data does not stop a run. An S3 body that breaks off halfway is resumed where it stopped (``storage.open_read``);
a tar that is corrupt or truncated, or a sample that cannot be decoded, is skipped: the shard's name is logged, the
rest of a broken tar is passed over, and every sample lost that way is counted in ``Crop.skipped`` (summed into
``batch["skipped"]``, which the loop logs as ``skipped_samples``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import shards as shard_format
from pipeline import storage

log = logging.getLogger(__name__)

MAX_SKIPS_IN_A_ROW = 1000  # samples skipped with no good one between them: the data is broken, not a sample
# What broken bytes raise while a shard is read (tarfile, storage: StorageError is a RuntimeError) or a sample is
# decoded (json, numpy, soundfile's LibsndfileError is a RuntimeError; a missing member or meta key, a wrong type).
BROKEN_DATA = (tarfile.TarError, EOFError, OSError, RuntimeError, ValueError, KeyError, TypeError)


@dataclass
class Crop:
    """One training example: a fixed-length window of latents (or audio) with its timing and caption."""

    x: np.ndarray  # (C, W) float32: latents, or audio (2, W samples) for the VAE
    mask: np.ndarray  # (W,) bool, True = real frame
    seconds_start: float  # floor(offset_seconds + crop offset), in whole seconds
    seconds_total: float  # length of the source file (ceil), from the metadata
    caption: str
    key: str
    skipped: int = 0  # samples of this stream skipped as unreadable since the previous crop


# ----------------------------------------------------------------------------------------------- crops (pure)
def crop(
    x: np.ndarray,
    meta: dict[str, Any],
    window: int,
    rate: float,
    pad_value: np.ndarray | float,
    rng: random.Random | None,
    key: str = "",
    cut_seconds: int | None = None,
) -> Crop:
    """Cut a window of ``window`` frames out of ``x`` (C, T) at ``rate`` frames per second.

    ``rng`` None takes the window at frame 0 (evaluation); otherwise its start is uniform over every position that
    keeps the window inside the segment. ``pad_value`` (C,) or a scalar fills frames past the end of short segments.
    ``cut_seconds`` (a timing crop, with ``rng``): a random ``cut_seconds``-long stretch of the segment becomes a
    file of its own, ``seconds_start`` 0 and ``seconds_total`` ``cut_seconds``, padded to the window; a segment
    shorter than that is cropped as usual.
    """
    channels, length = x.shape
    cut = round(cut_seconds * rate) if cut_seconds is not None and rng is not None else length
    if cut < min(length, window):
        start = rng.randint(0, length - cut)  # type: ignore[union-attr]
        x, length, meta = x[:, start : start + cut], cut, {**meta, "offset_seconds": 0.0, "seconds_total": cut_seconds}
    start = rng.randint(0, length - window) if rng is not None and length > window else 0
    part = x[:, start : start + window].astype(np.float32)
    real = part.shape[1]
    mask = np.zeros(window, dtype=bool)
    mask[:real] = True
    if real < window:
        fill = np.broadcast_to(np.asarray(pad_value, dtype=np.float32).reshape(-1, 1), (channels, window - real))
        part = np.concatenate([part, fill], axis=1)
    offset = float(meta.get("offset_seconds", 0.0)) + start / rate
    # A small epsilon keeps exact integers (e.g. 3.0 from 2.5 + 0.5) from flooring to 2 through float error.
    return Crop(
        x=part,
        mask=mask,
        seconds_start=float(math.floor(offset + 1e-6)),
        seconds_total=float(meta["seconds_total"]),
        caption=str(meta.get("caption", "")),
        key=key,
    )


def drop_caption_fields(caption: str, dropout: float, rng: random.Random) -> str:
    """A random subset of the caption's comma-separated fields in random order, as Stable Audio builds its prompts
    from a random subset of each file's metadata: each field is left out with chance ``dropout``, at least one is
    kept. No single field (a title, say) then always comes with a piece, so the text side has to learn what the
    shared fields (instrument, key, tempo) sound like. A caption of one field comes back as it is."""
    fields = [field.strip() for field in caption.split(",") if field.strip()]
    if len(fields) < 2:
        return caption
    kept = [field for field in fields if rng.random() >= dropout] or [rng.choice(fields)]
    rng.shuffle(kept)
    return ", ".join(kept)


def silence_latent(vae: torch.nn.Module, seconds: float = 1.0) -> np.ndarray:
    """The VAE's latent of digital silence, (C,): the middle frame of encoding ``seconds`` of zeros.

    The middle frame is away from the encoder's zero padding at the edges, so it is the steady-state code that a
    stretch of silence decodes from.
    """
    samples = int(seconds * vae.sample_rate)
    device = next(vae.parameters()).device
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, vae.cfg.audio_channels, samples, device=device))  # (1, C, T)
    return z[0, :, z.shape[-1] // 2].float().cpu().numpy()


# ----------------------------------------------------------------------------------------------- shard split
def slot_shards(urls: list[str], slot: int, slots: int) -> list[str]:
    """Shards of slot ``slot`` of ``slots``; never empty when ``urls`` is not (fewer shards than slots: reuse)."""
    if not urls:
        raise ValueError("no shards to read")
    if len(urls) >= slots:
        return urls[slot::slots]
    return [urls[slot % len(urls)]]


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------------------------- dataset
class ShardCrops(IterableDataset):
    """Crops streamed from tar shards (:func:`read_samples`), shuffled in WebDataset's seeded buffer.

    Args:
        urls: tar URIs (local paths or s3://), e.g. ``pipeline.shards.shard_uris(out, split)``.
        window: crop length in frames (latent frames, or audio samples when ``payload == "flac"``).
        rate: frames per second of the payload (latent_rate, or the audio sample rate).
        pad_value: (C,) silence latent or a scalar, for short segments.
        rank, world_size: this process's place among the training ranks.
        seed: base seed; each slot and pass derives its own.
        shuffle_buffer: samples in the shuffle buffer (0 = no shuffling, random crops still random).
        infinite: cycle forever (training) or read each shard of the slot once (evaluation, crops at frame 0).
        payload: ``"latents.npy"`` (latent shards) or ``"flac"`` (audio shards, for the VAE).
        timing_crops: share of training crops cut to a random whole number of seconds shorter than the window
            (1 to window - 1) and padded with silence, as a file of that length (see :func:`crop`).
        caption_field_dropout: chance that each comma-separated field of a training crop's caption is left out
            (the rest shuffled, at least one kept; see :func:`drop_caption_fields`); 0 keeps captions as they are.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        window: int,
        rate: float,
        pad_value: np.ndarray | float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 0,
        infinite: bool = True,
        payload: str = "latents.npy",
        timing_crops: float = 0.0,
        caption_field_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if payload not in shard_format.PAYLOADS:
            raise ValueError(f"payload must be one of {shard_format.PAYLOADS}, got {payload!r}")
        self.urls, self.window, self.rate, self.pad_value = sorted(urls), window, rate, pad_value
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.infinite, self.payload = shuffle_buffer, infinite, payload
        self.timing_crops, self.caption_field_dropout = timing_crops, caption_field_dropout

    def _shard_stream(self, slot: int, slots: int) -> Iterator[str]:
        mine = slot_shards(self.urls, slot, slots)
        epoch = 0
        while True:
            order = list(mine)
            if self.infinite:
                random.Random(f"{self.seed}/{slot}/{epoch}").shuffle(order)
            yield from order
            if not self.infinite:
                return
            epoch += 1

    def _samples(self, urls: Iterator[str], skipped: list[int]) -> Iterator[dict[str, Any]]:
        """The samples of each shard in turn; a shard that breaks off adds its unfinished sample to ``skipped[0]``.

        A whole pass over the slot's shards without one readable sample raises: the stream would spin forever."""
        good, seen = 0, set()
        for url in urls:
            if url in seen:  # a new pass
                if not good:
                    raise ValueError(f"no readable sample in {sorted(seen)}")
                good, seen = 0, set()
            seen.add(url)
            for sample in read_samples(url, skipped):
                good += 1
                yield sample

    def _decode(self, sample: dict[str, Any], rng: random.Random | None) -> Crop:
        key = sample["__key__"]
        if not shard_format.KEY_RE.match(key):
            raise shard_format.ShardFormatError(f"{sample.get('__url__')}: bad sample key {key!r}")
        meta = json.loads(sample["json"])
        if self.payload == "flac":
            x = _decode_flac(sample["flac"])
        else:
            x = shard_format.npy_load(sample["latents.npy"])
        cut = None
        if rng is not None and self.timing_crops > 0 and rng.random() < self.timing_crops:
            cut = rng.randint(1, max(1, int(self.window / self.rate) - 1))  # whole seconds, shorter than the window
        item = crop(x, meta, self.window, self.rate, self.pad_value, rng, key=key, cut_seconds=cut)
        if rng is not None and self.caption_field_dropout > 0:
            item.caption = drop_caption_fields(item.caption, self.caption_field_dropout, rng)
        return item

    def __iter__(self) -> Iterator[Crop]:
        import webdataset as wds

        worker, workers = _slot()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(f"{self.seed}/crop/{slot}") if self.infinite else None
        skipped = [0]  # unreadable samples not yet reported with a crop
        samples = self._samples(self._shard_stream(slot, slots), skipped)
        if self.shuffle_buffer > 0 and self.infinite:
            buffer = self.shuffle_buffer
            samples = wds.shuffle(buffer, initial=buffer, rng=random.Random(f"{self.seed}/shuffle/{slot}"))(samples)
        for sample in samples:
            try:
                item = self._decode(sample, rng)
            except BROKEN_DATA as exc:
                skipped[0] += 1
                log.warning(
                    "skipped sample %s of %s: %s: %s", sample["__key__"], sample["__url__"], type(exc).__name__, exc
                )
                if skipped[0] > MAX_SKIPS_IN_A_ROW:
                    raise ValueError(f"{skipped[0]} samples in a row could not be decoded; last: {exc}") from exc
                continue
            item.skipped, skipped[0] = skipped[0], 0
            yield item


def read_samples(url: str, skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, streamed, as WebDataset groups them: ``{"__key__", "__url__", EXT: bytes}``.

    Members are read in order and grouped by key (``KEY.json``, ``KEY.latents.npy`` / ``KEY.flac``). If the tar
    cannot be read to its end (truncated, corrupt, or its S3 body fails past the storage retries), the shard's name
    is logged, a last sample that is whole (json + payload) is kept, and the rest of the shard is passed over: one
    sample is added to ``skipped[0]`` for it (the one being read, or the unreadable rest when the tar broke off
    between samples). Samples past the break are never seen, so they cannot be counted one by one.
    """
    current: dict[str, Any] | None = None
    member_name = "<first header>"
    try:
        with storage.open_read(url) as stream:
            tail = _Tail(stream)
            with tarfile.open(fileobj=tail, mode="r|") as tar:
                for member in tar:
                    member_name = member.name
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    data = tar.extractfile(member).read()
                    current = current or {"__key__": key, "__url__": url}
                    current[ext.lower()] = data
                # tarfile ends quietly at a missing or garbled header: only the end marker says the tar is whole
                if not tail.zeros_at(tar.offset):
                    raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset}: truncated or corrupt")
    except BROKEN_DATA as exc:
        if skipped is not None:
            skipped[0] += 1
        log.warning(
            "shard %s is unreadable after member %s (%s: %s); skipping the rest of it",
            url,
            member_name,
            type(exc).__name__,
            exc,
        )
        if current is None or "json" not in current or not any(p in current for p in shard_format.PAYLOADS):
            return
    if current is not None:
        yield current


class _Tail:
    """A read-only stream that remembers the last bytes it passed on, so that a tar's end can be checked."""

    KEEP = 64 * 1024  # more than tarfile reads ahead (one 10 KiB record)

    def __init__(self, stream: Any) -> None:
        self.stream, self.tail, self.tail_start = stream, b"", 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.tail += data
        if len(self.tail) > 2 * self.KEEP:
            self.tail_start += len(self.tail) - self.KEEP
            self.tail = self.tail[-self.KEEP :]
        return data

    def zeros_at(self, offset: int) -> bool:
        """Whether the 512-byte block at ``offset`` was read and is all zeros (a tar's end-of-archive block)."""
        block = self.tail[offset - self.tail_start : offset - self.tail_start + tarfile.BLOCKSIZE]
        return offset >= self.tail_start and len(block) == tarfile.BLOCKSIZE and not any(block)


def _decode_flac(data: bytes) -> np.ndarray:
    """FLAC bytes → (channels, N) float32; mono is duplicated to stereo."""
    import soundfile as sf

    audio, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (N, ch)
    audio = audio.T
    return np.repeat(audio, 2, axis=0) if audio.shape[0] == 1 else audio[:2]


def collate(crops: list[Crop]) -> dict[str, Any]:
    """Stack crops: x (B, C, W) float32, mask (B, W) bool, seconds_start/total (B,) float32, captions, keys."""
    return {
        "x": torch.from_numpy(np.stack([c.x for c in crops])),
        "mask": torch.from_numpy(np.stack([c.mask for c in crops])),
        "seconds_start": torch.tensor([c.seconds_start for c in crops], dtype=torch.float32),
        "seconds_total": torch.tensor([c.seconds_total for c in crops], dtype=torch.float32),
        "caption": [c.caption for c in crops],
        "key": [c.key for c in crops],
        "skipped": sum(c.skipped for c in crops),  # unreadable samples passed over while these were read
    }


def loader(dataset: ShardCrops, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of :func:`collate`; workers get their own slot of the shard list (see :class:`ShardCrops`).
    ``pin_memory`` (on for GPU runs) lets the loop's ``to_device`` copy each batch without blocking."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        drop_last=dataset.infinite,
        pin_memory=pin_memory,
    )


def batches_from(
    cfg: Any,
    urls: list[str],
    window: int,
    rate: float,
    pad_value: np.ndarray | float,
    rank: int,
    world_size: int,
    payload: str = "latents.npy",
) -> Callable[[int], Iterator[dict[str, Any]]]:
    """``start_step → batches`` for a TrainConfig: the crops' seed moves with the start step, so a resumed run does
    not replay the exact crops it already saw."""

    def make(start_step: int) -> Iterator[dict[str, Any]]:
        dataset = ShardCrops(
            urls,
            window=window,
            rate=rate,
            pad_value=pad_value,
            rank=rank,
            world_size=world_size,
            seed=cfg.run.seed * 1_000_003 + start_step,
            shuffle_buffer=cfg.data.shuffle_buffer,
            payload=payload,
            timing_crops=cfg.data.timing_crops,
            caption_field_dropout=cfg.data.caption_field_dropout,
        )
        return iter(loader(dataset, cfg.deepspeed.micro_batch, cfg.data.num_loader_workers, cfg.scaling.use_gpu))

    return make


def holdout(
    cfg: Any, window: int, rate: float, pad_value: np.ndarray | float, payload: str = "latents.npy"
) -> dict[str, Any] | None:
    """The held-out samples a run scores at every checkpoint, as one batch (crops at frame 0), or None when
    ``data.holdout_split`` is unset. They come from ``data.holdout_shards`` (default ``data.shards``); the first
    ``data.holdout_samples`` in shard order, so every checkpoint of a run scores the same samples."""
    split = cfg.data.holdout_split
    if not split:
        return None
    out = cfg.data.holdout_shards or cfg.data.shards
    urls = shard_format.shard_uris(out, split)
    if not urls:
        raise ValueError(f"data.holdout_split: no {split!r} shards under {out}")
    dataset = ShardCrops(urls, window=window, rate=rate, pad_value=pad_value, infinite=False, payload=payload)
    crops = []
    for c in dataset:
        crops.append(c)
        if len(crops) == cfg.data.holdout_samples:
            break
    return collate(crops)


def read_captions(urls: list[str], max_shards: int = 64) -> list[str]:
    """Every caption of the first ``max_shards`` shards (sorted), for training the tokenizer.

    Bounded so that starting a run on a large dataset does not read it all; every rank gets the same list.
    """
    captions = []
    for uri in sorted(urls)[:max_shards]:
        for sample in read_samples(uri):  # a broken shard gives what it has (and a warning)
            try:
                captions.append(str(json.loads(sample["json"]).get("caption", "")))
            except BROKEN_DATA as exc:
                log.warning("no caption from sample %s of %s: %s", sample["__key__"], uri, exc)
    return captions
