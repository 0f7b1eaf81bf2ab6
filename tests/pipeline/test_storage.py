"""pipeline.storage against the real SeaweedFS S3 server of the local stack, and on local paths."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from infra import processes, stack
from pipeline import storage

pytestmark = pytest.mark.stack


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_exists_delete(where, tmp_path, local_stack):
    base = str(tmp_path) if where == "local" else local_stack.s3_prefix("rw")
    uri = storage.join(base, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello" and storage.size(uri) == 5
    with storage.open_read(uri) as fh:
        assert fh.read() == b"hello"
    storage.write_text(uri, "replaced")
    assert storage.read_text(uri) == "replaced"
    assert list(storage.list_uris(base)) == [uri]
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.json"
    storage.write_text(target, "1")
    storage.write_text(target, "2")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert target.read_text() == "2"


def test_list_paginates_past_1000_keys(local_stack):
    prefix = local_stack.s3_prefix("many")
    names = [f"k{i:05d}" for i in range(1105)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: storage.write_bytes(f"{prefix}/{n}", n.encode()), names))
    listed = list(storage.list_uris(prefix))
    assert listed == [f"{prefix}/{n}" for n in names]  # sorted, complete, no duplicates across pages
    assert storage.delete_prefix(prefix) == 1105
    assert list(storage.list_uris(prefix)) == []


def test_50mb_multipart_upload_reads_back_identical(local_stack, tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 50 * 1024 * 1024, dtype=np.uint8).tobytes()
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = local_stack.s3_prefix("big") + "/big.bin"
    storage.write_file(uri, src)
    bucket, key = storage.split_s3(uri)
    etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith("-7"), etag  # 50 MiB in 8 MiB parts: a completed multipart upload
    got = hashlib.sha256()
    with storage.open_read(uri) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            got.update(chunk)
    assert got.hexdigest() == hashlib.sha256(data).hexdigest()
    storage.delete(uri)


def test_webdataset_shard_on_s3_streams_back(local_stack):
    import webdataset as wds

    storage.register_webdataset()
    prefix = local_stack.s3_prefix("wds")
    expected = {}
    for shard in range(2):
        with wds.TarWriter(f"{prefix}/train-{shard:06d}.tar") as sink:  # written through our s3 gopen
            for i in range(5):
                key = f"s{shard}_{i}"
                arr = np.full((4, 3 + i), shard * 10 + i, dtype=np.float16)
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                sink.write({"__key__": key, "latents.npy": buf.getvalue(), "json": {"caption": key}})
                expected[key] = arr
    urls = sorted(storage.list_uris(prefix))
    assert len(urls) == 2
    ds = wds.WebDataset(urls, nodesplitter=wds.split_by_node, shardshuffle=False)
    seen = {}
    for sample in ds:
        arr = np.load(io.BytesIO(sample["latents.npy"]), allow_pickle=False)
        seen[sample["__key__"]] = arr
        assert json.loads(sample["json"])["caption"] == sample["__key__"]
    assert seen.keys() == expected.keys()
    for key, arr in expected.items():
        np.testing.assert_array_equal(seen[key], arr)
    with storage.open_read(urls[0]) as fh:
        assert len(tarfile.open(fileobj=io.BytesIO(fh.read())).getnames()) == 10


def test_wrong_secret_key_fails_with_a_clear_error(local_stack, monkeypatch):
    good = local_stack.env["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.StorageAuthError) as err:
        storage.write_bytes(local_stack.s3_prefix("auth") + "/x", b"x")
    message = str(err.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and "rejected the credentials" in message
    assert "not-the-secret" not in message and good not in message
    with pytest.raises(storage.StorageAuthError):
        list(storage.list_uris(local_stack.s3_prefix("auth")))


def test_s3_restart_mid_sequence_is_survived_by_retries(local_stack):
    """Kill the S3 server while a writer thread is mid-sequence; `stack up` restarts it; no write is lost."""
    prefix = local_stack.s3_prefix("restart")
    written, errors = [], []

    def writer():
        for i in range(40):
            try:
                storage.write_bytes(f"{prefix}/{i:03d}", f"payload-{i}".encode())
                written.append(i)
            except Exception as exc:  # noqa: BLE001 - the test reports any failure below
                errors.append(repr(exc))
            time.sleep(0.1)

    thread = threading.Thread(target=writer)
    thread.start()
    while len(written) < 5:
        time.sleep(0.05)
    pgid = local_stack.state.pgids["s3"]
    os.killpg(pgid, 9)  # a hard crash, not a graceful stop
    while processes.group_alive(pgid):
        time.sleep(0.05)
    time.sleep(2)  # writes keep failing (connection refused) while the server is down
    assert len(written) < 40
    stack.up(local_stack.state_dir)  # restarts only S3, on the same port
    assert local_stack.state.ports["s3"] == int(local_stack.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    thread.join(timeout=180)
    assert errors == [] and written == list(range(40))
    for i in range(40):
        assert storage.read_bytes(f"{prefix}/{i:03d}") == f"payload-{i}".encode()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_text_has_exactly_one_winner(where, tmp_path, local_stack):
    """A conditional create (hard link locally, If-None-Match on S3): of 8 racing writers one creates the object."""
    base = str(tmp_path) if where == "local" else local_stack.s3_prefix("create")
    uri = storage.join(base, "d", "plan.json")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage.create_text(uri, f"job {i}"), range(8)))
    assert sum(won) == 1 and storage.read_text(uri) == f"job {won.index(True)}"
    assert storage.create_text(uri, "late") is False and storage.read_text(uri) == f"job {won.index(True)}"
    if where == "local":
        assert [p.name for p in (tmp_path / "d").iterdir()] == ["plan.json"]  # no temp file left behind


@pytest.mark.parametrize("where", ["local", "s3"])
def test_open_write_is_atomic_and_writes_nothing_on_error(where, tmp_path, local_stack):
    """Issue 15 item 5: a large object streams through a temp file; readers see the old object until the block ends."""
    base = str(tmp_path) if where == "local" else local_stack.s3_prefix("open-write")
    uri = storage.join(base, "d", "big.tar")
    storage.write_bytes(uri, b"old")
    with storage.open_write(uri) as out:
        for i in range(3):
            out.write(bytes([i]) * 1024 * 1024)
            assert storage.read_bytes(uri) == b"old"
    assert storage.read_bytes(uri) == b"".join(bytes([i]) * 1024 * 1024 for i in range(3))
    with pytest.raises(RuntimeError, match="mid-write"), storage.open_write(uri) as out:
        out.write(b"partial")
        raise RuntimeError("mid-write")
    assert storage.size(uri) == 3 * 1024 * 1024
    if where == "local":
        assert [p.name for p in (tmp_path / "d").iterdir()] == ["big.tar"]  # no temp file left behind
