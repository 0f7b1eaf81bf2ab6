"""Crops, timing, padding and the per-rank shard split of the streaming dataset (local shards, no services)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest
import torch

from pipeline import shards
from pipeline.models.autoencoder import AUTOENCODER_PRESETS, Autoencoder, build_autoencoder
from train import data

RATE = 44100 / 1024


def meta(offset: float, total: float, caption: str = "c") -> dict:
    return {"offset_seconds": offset, "seconds_total": total, "caption": caption}


def test_crop_timing_on_known_offsets() -> None:
    x = np.arange(10 * 100, dtype=np.float32).reshape(10, 100)  # 100 frames at 10 frames/s = 10 s
    rng = random.Random(0)
    for _ in range(50):
        c = data.crop(x, meta(offset=95.0, total=120.0), window=20, rate=10.0, pad_value=0.0, rng=rng)
        start = int(c.x[0, 0])  # channel 0 holds the frame index
        assert 0 <= start <= 80 and c.mask.all()
        assert c.seconds_start == np.floor(95.0 + start / 10.0)
        assert c.seconds_total == 120.0
        np.testing.assert_array_equal(c.x[3], x[3, start : start + 20])
    # exact boundaries: a crop starting 2.5 s into a segment at 2.5 s starts at second 5, not 4 (float error)
    x2 = np.zeros((1, 400), dtype=np.float32)
    rng_fixed = random.Random()
    rng_fixed.randint = lambda a, b: 25  # type: ignore[method-assign]
    c = data.crop(x2, meta(offset=2.5, total=50.0), window=100, rate=10.0, pad_value=0.0, rng=rng_fixed)
    assert c.seconds_start == 5.0
    # evaluation crops start at the segment start
    c = data.crop(x, meta(offset=7.9, total=20.0), window=20, rate=10.0, pad_value=0.0, rng=None)
    assert c.seconds_start == 7.0 and c.x[0, 0] == 0


def test_short_segment_is_padded_with_the_silence_latent() -> None:
    torch.manual_seed(0)
    biased = Autoencoder(dataclasses.replace(AUTOENCODER_PRESETS["tiny"], conv_bias=True))
    silence = data.silence_latent(biased)
    assert silence.shape == (64,) and np.abs(silence).sum() > 0  # with conv biases silence has a code of its own
    # the tiny preset has no conv biases: silence encodes to exactly the zero latent
    np.testing.assert_array_equal(data.silence_latent(build_autoencoder("tiny")), np.zeros(64, np.float32))
    x = np.ones((64, 7), dtype=np.float16)
    c = data.crop(x, meta(offset=3.0, total=4.0), window=12, rate=RATE, pad_value=silence, rng=random.Random(1))
    assert c.x.shape == (64, 12) and c.x.dtype == np.float32
    assert c.mask.tolist() == [True] * 7 + [False] * 5
    np.testing.assert_array_equal(c.x[:, :7], 1.0)
    np.testing.assert_allclose(c.x[:, 7:], np.repeat(silence[:, None], 5, axis=1))
    assert c.seconds_start == 3.0 and c.seconds_total == 4.0


def test_slot_shards_never_empty_and_cover_everything() -> None:
    urls = [f"s{i}" for i in range(5)]
    parts = [data.slot_shards(urls, i, 2) for i in range(2)]
    assert parts == [["s0", "s2", "s4"], ["s1", "s3"]]
    few = [data.slot_shards(urls[:1], i, 4) for i in range(4)]
    assert few == [["s0"]] * 4
    with pytest.raises(ValueError):
        data.slot_shards([], 0, 1)


def _write(tmp_path, counts: list[int]) -> list[str]:
    out = str(tmp_path / "out")
    stats = []
    for n, count in enumerate(counts):
        samples = [
            shards.Sample(
                key=f"s{n}_{i}",
                meta={**meta(offset=float(i), total=float(i + 5), caption=f"shard {n} item {i}"), "latent_rate": RATE},
                latents=np.full((4, 30 + i), n, dtype=np.float16),
            )
            for i in range(count)
        ]
        stats.append(shards.write_shard(out, shards.shard_name("train", n), samples))
    shards.write_index(
        out, vae_id="x", vae_config_hash="x", latent_channels=4, latent_rate=RATE, shards=stats, errors=[]
    )
    return shards.shard_uris(out, "train")


def _one_shard(tmp_path, caption: str = "c") -> list[str]:
    """One train shard of four 11.6 s segments (500 frames) of a 12 s file captioned ``caption``; its URIs."""
    samples = [
        shards.Sample(
            key=f"s0_{i}", meta={**meta(0.0, 12.0, caption), "latent_rate": RATE}, latents=np.ones((4, 500), np.float16)
        )
        for i in range(4)
    ]
    stats = [shards.write_shard(str(tmp_path), shards.shard_name("train", 0), samples)]
    shards.write_index(
        str(tmp_path), vae_id="x", vae_config_hash="x", latent_channels=4, latent_rate=RATE, shards=stats, errors=[]
    )
    return shards.shard_uris(str(tmp_path), "train")


def test_ranks_stream_forever_on_uneven_shards(tmp_path) -> None:
    urls = _write(tmp_path, [3, 1, 2])  # 3 shards over 2 ranks: rank 0 gets 2 shards (5 samples), rank 1 one (1)
    keys = {}
    for rank in range(2):
        ds = data.ShardCrops(urls, window=32, rate=RATE, rank=rank, world_size=2, seed=7, shuffle_buffer=4)
        crops = list(itertools.islice(iter(ds), 40))  # far more than a pass: the stream cycles, never ends
        keys[rank] = {c.key for c in crops}
        assert all(c.x.shape == (4, 32) for c in crops)
    assert keys[0] == {"s0_0", "s0_1", "s0_2", "s2_0", "s2_1"} and keys[1] == {"s1_0"}
    # seeded: the same seed gives the same stream
    a = [
        c.key for c in itertools.islice(iter(data.ShardCrops(urls, window=32, rate=RATE, seed=3, shuffle_buffer=4)), 12)
    ]
    b = [
        c.key for c in itertools.islice(iter(data.ShardCrops(urls, window=32, rate=RATE, seed=3, shuffle_buffer=4)), 12)
    ]
    assert a == b


def test_loader_workers_split_and_collate(tmp_path) -> None:
    urls = _write(tmp_path, [2, 2, 2, 2])
    ds = data.ShardCrops(urls, window=40, rate=RATE, pad_value=-1.0, infinite=False)
    batches = list(data.loader(ds, batch_size=3, num_workers=2))
    keys = sorted(k for b in batches for k in b["key"])
    assert keys == sorted(f"s{n}_{i}" for n in range(4) for i in range(2))  # one pass, each sample once
    b = batches[0]
    assert b["x"].dtype == torch.float32 and b["x"].shape[1:] == (4, 40) and b["mask"].dtype == torch.bool
    assert b["seconds_start"].dtype == torch.float32 and isinstance(b["caption"], list)
    assert (b["x"][~b["mask"][:, None, :].expand_as(b["x"])] == -1.0).all()  # padding value where mask is False


def _truncate(uri: str, keep: float) -> None:
    with open(uri, "r+b") as f:
        size = f.seek(0, 2)
        f.truncate(int(size * keep))


def test_truncated_shards_are_skipped_counted_and_named(tmp_path, caplog) -> None:
    """Issue 15 item 7: a tar cut off mid-member and one cut off between samples (before: tarfile.ReadError /
    KeyError 'json' ended the stream, and with it the training worker)."""
    urls = _write(tmp_path, [4, 4, 3, 2])
    with open(urls[0], "r+b") as f:  # inside the data of s0_2's first member
        f.truncate(4608 + 100)
    with open(urls[1], "r+b") as f:  # at a member boundary: tarfile alone would read a shorter, "whole" tar
        f.truncate(4096)
    with open(urls[2], "r+b") as f:  # after s2_0's first member: a sample that lacks a part
        f.truncate(1024)
    caplog.set_level("WARNING", logger="train.data")
    crops = list(data.ShardCrops(urls, window=32, rate=RATE, infinite=False))
    keys = [c.key for c in crops]
    assert keys == ["s0_0", "s0_1", "s1_0", "s1_1", "s3_0", "s3_1"]
    assert sum(c.skipped for c in crops) == 3  # s0_2, s1_2 (being read when the tar broke off) and s2_0
    assert all(u in caplog.text for u in urls[:3])
    # training streams cycle over the broken shards and keep going, counting each pass
    stream = list(itertools.islice(iter(data.ShardCrops(urls, window=32, rate=RATE, seed=1, shuffle_buffer=4)), 60))
    assert sum(c.skipped for c in stream) >= 4
    batch = data.collate(stream[:8])
    assert batch["skipped"] == sum(c.skipped for c in stream[:8])
    # the tokenizer's captions come from what can be read
    assert data.read_captions(urls) == [f"shard {k[1]} item {k[3]}" for k in keys]


def test_a_slot_with_no_readable_sample_stops_with_a_clear_error(tmp_path) -> None:
    urls = _write(tmp_path, [2, 2])
    for uri in urls:
        _truncate(uri, 0.05)
    with pytest.raises(ValueError, match="no readable sample"):
        next(iter(data.ShardCrops(urls, window=32, rate=RATE, seed=1)))


def test_a_timing_crop_is_a_short_file_of_whole_seconds(tmp_path) -> None:
    """``cut_seconds``: a random stretch of that many whole seconds becomes a file of its own (start 0, total = the
    cut), padded with silence to the window; ``data.timing_crops`` is the share of training crops cut so."""
    x = np.arange(10 * 100, dtype=np.float32).reshape(10, 100)  # 100 frames at 10 frames/s: a 10 s segment
    rng = random.Random(0)
    starts = set()
    for _ in range(40):
        c = data.crop(x, meta(offset=30.0, total=95.0), window=60, rate=10.0, pad_value=-1.0, rng=rng, cut_seconds=3)
        start = int(c.x[0, 0])
        starts.add(start)
        assert c.mask.tolist() == [True] * 30 + [False] * 30
        np.testing.assert_array_equal(c.x[2, :30], x[2, start : start + 30])
        assert (c.x[:, 30:] == -1.0).all() and c.seconds_start == 0.0 and c.seconds_total == 3.0
    assert len(starts) > 10 and max(starts) <= 70  # anywhere in the segment
    short = data.crop(
        x[:, :20], meta(offset=0.0, total=2.0), window=60, rate=10.0, pad_value=0.0, rng=rng, cut_seconds=5
    )
    assert short.mask.sum() == 20 and short.seconds_total == 2.0  # a segment shorter than the cut is left whole
    evaluation = data.crop(
        x, meta(offset=30.0, total=95.0), window=60, rate=10.0, pad_value=0.0, rng=None, cut_seconds=3
    )
    assert evaluation.mask.all() and evaluation.seconds_total == 95.0  # evaluation crops are never cut

    urls = _one_shard(tmp_path)  # 11.6 s segments of a 12 s file

    def crops(share: float) -> list[data.Crop]:
        stream = data.ShardCrops(urls, window=345, rate=RATE, seed=1, timing_crops=share)  # 8 s windows
        return list(itertools.islice(iter(stream), 200))

    assert {c.seconds_total for c in crops(0.0)} == {12.0}
    cut = crops(1.0)
    assert {c.seconds_total for c in cut} == {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0}  # whole seconds under the window
    assert all(c.mask.sum() == round(c.seconds_total * RATE) and c.seconds_start == 0.0 for c in cut)
    share = sum(c.seconds_total < 12.0 for c in crops(0.5)) / 200
    assert 0.35 < share < 0.65


def test_caption_field_dropout_keeps_a_shuffled_random_subset(tmp_path) -> None:
    """``data.caption_field_dropout``: each comma-separated field of a training caption is left out with that
    chance, the rest come in random order and at least one stays; held-out crops keep their captions whole."""
    caption = "Agnus I by Palestrina, played on harpsichord, in C major, 4/2 time, 62 BPM"
    fields = caption.split(", ")
    rng = random.Random(0)
    drawn = [data.drop_caption_fields(caption, 0.5, rng) for _ in range(2000)]
    parts = [d.split(", ") for d in drawn]
    assert all(p and len(set(p)) == len(p) and set(p) <= set(fields) for p in parts)  # a subset, never empty
    kept = sum(len(p) for p in parts) / (2000 * len(fields))
    assert 0.47 < kept < 0.56  # half dropped, a little more kept by the at-least-one rule (1/32 of draws)
    assert sum(p == fields for p in parts) < sum(len(p) == len(fields) for p in parts)  # full sets come shuffled
    for field in fields:
        assert 0.4 < sum(field in p for p in parts) / 2000 < 0.6  # the title no more often than the tempo
    assert data.drop_caption_fields("one field only", 0.9, rng) == "one field only"
    assert sorted(data.drop_caption_fields(caption, 0.0, random.Random(1)).split(", ")) == sorted(fields)

    urls = _one_shard(tmp_path, caption)
    off = data.ShardCrops(urls, window=345, rate=RATE, seed=1)
    assert {c.caption for c in itertools.islice(iter(off), 50)} == {caption}  # off by default
    on = data.ShardCrops(urls, window=345, rate=RATE, seed=1, caption_field_dropout=0.5)
    assert len({c.caption for c in itertools.islice(iter(on), 50)}) > 20
    again = data.ShardCrops(urls, window=345, rate=RATE, seed=1, caption_field_dropout=0.5)
    assert [c.caption for c in itertools.islice(iter(on), 50)] == [c.caption for c in itertools.islice(iter(again), 50)]
    held = data.ShardCrops(urls, window=345, rate=RATE, infinite=False, caption_field_dropout=0.5)
    assert {c.caption for c in held} == {caption}  # evaluation crops are never touched
