"""Listing, captions (manifests in three formats, sidecars), keys and the deterministic shard plan."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.shards import KEY_RE
from preprocess import sources


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


ROWS = [
    {"path": "b.wav", "caption": "bee", "genre": "drone", "bpm": 1.5},
    {"path": "./dir/a b.flac", "caption": "ay", "genre": "x", "bpm": None},
    {"path": "gone.mp3", "caption": "missing file", "genre": "y", "bpm": 3.0},
]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_manifest_captions_and_meta(tmp_path, kind):
    _touch(tmp_path, "b.wav", "dir/a b.flac", "c.ogg", "notes.md")
    path = tmp_path / f"manifest.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows(ROWS)
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    items, errors = sources.list_inputs(str(tmp_path))
    assert [i.uri.removeprefix(str(tmp_path) + "/") for i in items] == ["b.wav", "c.ogg", "dir/a b.flac"]
    by_name = {i.uri.rsplit("/", 1)[-1]: i for i in items}
    assert by_name["b.wav"].caption == "bee" and by_name["a b.flac"].caption == "ay"
    assert by_name["b.wav"].meta["genre"] == "drone"
    if kind != "csv":  # csv cells are strings
        assert by_name["b.wav"].meta["bpm"] == 1.5 and by_name["a b.flac"].meta["bpm"] is None
    assert by_name["c.ogg"].caption is None and by_name["c.ogg"].sidecar is None
    assert errors == [{"source_uri": str(tmp_path / "gone.mp3"), "reason": errors[0]["reason"]}]
    assert errors[0]["reason"].startswith("missing:")
    assert all(KEY_RE.match(i.key) for i in items) and len({i.key for i in items}) == 3


def test_sidecars_and_explicit_manifest(tmp_path):
    _touch(tmp_path, "src/x.wav", "src/y.wav")
    (tmp_path / "src/x.txt").write_text("ex")
    (tmp_path / "src/y.json").write_text(json.dumps({"caption": "why", "k": 1}))
    items, _ = sources.list_inputs(str(tmp_path / "src"))
    assert [i.sidecar.rsplit("/", 1)[-1] for i in items] == ["x.txt", "y.json"]
    assert sources.read_sidecar(items[1].sidecar) == ("why", {"k": 1})
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "x.wav", "caption": "from manifest"}) + "\n")
    items, _ = sources.list_inputs(str(tmp_path / "src"), manifest=str(tmp_path / "m.jsonl"))
    assert items[0].caption == "from manifest" and items[1].sidecar.endswith("y.json")


def test_plan_is_deterministic_and_assigns_each_input_once(tmp_path):
    _touch(tmp_path, *[f"{i:02d}.wav" for i in range(11)])
    items, _ = sources.list_inputs(str(tmp_path))
    plan = sources.plan_shards(items, 4, "train")
    assert [p.name for p in plan] == ["train-000000", "train-000001", "train-000002"]
    assert [len(p.inputs) for p in plan] == [4, 4, 3]
    assert [i.uri for p in plan for i in p.inputs] == sorted(i.uri for i in items)
    again = sources.plan_shards(sources.list_inputs(str(tmp_path))[0], 4, "train")
    assert [[i.key for i in p.inputs] for p in again] == [[i.key for i in p.inputs] for p in plan]


def test_bad_sources_are_usage_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        sources.list_inputs(str(tmp_path / "nope"))
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"caption": "no path"}) + "\n")
    with pytest.raises(ConfigError, match="row 1 has no 'path'"):
        sources.list_inputs(str(tmp_path))
    deep = "[" * 100_000 + "]" * 100_000  # nested past Python's recursion limit
    (tmp_path / "manifest.jsonl").write_text('{"path": "x.wav", "meta": ' + deep + "}\n")
    with pytest.raises(ConfigError, match="manifest.jsonl cannot be parsed \\(RecursionError"):
        sources.list_inputs(str(tmp_path))


def test_input_keys_are_safe_and_stable():
    key = sources.input_key("some dir/Ünïcode name (1).wav")
    assert KEY_RE.match(key) and key == sources.input_key("some dir/Ünïcode name (1).wav")
    assert sources.input_key("a/x.wav") != sources.input_key("b/x.wav")


def test_manifest_paths_outside_src_are_refused_unless_allowed(tmp_path):
    _touch(tmp_path, "src/a.wav", "src/sub/b.wav", "secret.wav", "other/c.wav")
    src = tmp_path / "src"
    rows = [
        {"path": "../secret.wav", "caption": "climbs out"},
        {"path": str(tmp_path / "other/c.wav"), "caption": "absolute"},
        {"path": "sub/../a.wav", "caption": "stays inside"},
        {"path": str(src / "sub/b.wav"), "caption": "absolute, inside"},
    ]
    (src / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, errors = sources.list_inputs(str(src))
    assert [(i.uri, i.caption) for i in items] == [
        (str(src / "a.wav"), "stays inside"),
        (str(src / "sub/b.wav"), "absolute, inside"),
    ]
    assert sorted((e["source_uri"], e["reason"].split(":")[0]) for e in errors) == [
        (str(tmp_path / "other/c.wav"), "outside-src"),
        (str(tmp_path / "secret.wav"), "outside-src"),
    ]
    items, errors = sources.list_inputs(str(src), allow_outside_src=True)
    assert len(items) == 4 and errors == []


@pytest.mark.parametrize(
    ("uri", "inside"),
    [
        ("s3://b/raw/x.wav", True),
        ("s3://b/raw/../x.wav", False),  # S3 keeps '..' in a key literally; it must not count as inside
        ("s3://b/rawer/x.wav", False),
        ("s3://c/raw/x.wav", False),
        ("/raw/x.wav", False),
    ],
)
def test_inside_src_on_s3(uri, inside):
    assert sources._inside("s3://b/raw", uri) is inside
