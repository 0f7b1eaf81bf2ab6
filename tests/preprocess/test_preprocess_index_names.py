"""Shard names read back from a preprocess OUT's index.json are validated before they become paths (issue 15).

(pipeline.shards' reader, tested here with the preprocess outputs it reads; tests/pipeline/test_shards.py is its home.)
"""

from __future__ import annotations

import json

import pytest

from pipeline import shards


def _index(out, names: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    entries = [{"name": n, "samples": 1, "bytes": 1, "sha256": "0" * 64, "seconds": 1.0} for n in names]
    index = {"format_version": 1, "vae_id": "none", "latent_channels": 2, "latent_rate": 44100.0, "shards": entries}
    (out / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["../../../etc/passwd", "train-000000/../../x", "/abs-000000", "train-000001\n", 7])
def test_a_crafted_shard_name_in_the_index_is_refused(tmp_path, name):
    _index(tmp_path / "out", ["train-000000", name])
    with pytest.raises(shards.ShardFormatError, match="index.json: shard name"):
        shards.shard_uris(str(tmp_path / "out"))
    with pytest.raises(shards.ShardFormatError, match="index.json: shard name"):
        shards.verify(str(tmp_path / "out"))


def test_shard_names_the_job_writes_are_accepted(tmp_path):
    names = [shards.shard_name("train", 0), shards.shard_name("holdout2", 12), shards.shard_name("train", 1234567)]
    _index(tmp_path / "out", names)
    assert shards.shard_uris(str(tmp_path / "out")) == [shards.tar_uri(str(tmp_path / "out"), n) for n in sorted(names)]
