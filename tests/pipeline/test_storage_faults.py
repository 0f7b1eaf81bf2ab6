"""pipeline.storage when the S3 connection fails mid-way (no service: the client is faked, so the fault lands exactly
where the test wants it)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, ResponseStreamingError

from pipeline import s3, storage

DATA = bytes(range(256)) * 4096  # 1 MiB


class _Body:
    """A GET body that raises after ``fail_after`` bytes (None: never)."""

    def __init__(self, data: bytes, fail_after: int | None) -> None:
        self.data, self.fail_after, self.pos = data, fail_after, 0

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ResponseStreamingError(error="Connection broken: IncompleteRead")
        end = len(self.data) if n is None or n < 0 else self.pos + n
        if self.fail_after is not None and end > self.fail_after:
            if n is None or n < 0:  # read() of the rest: the bytes up to the drop are lost with the exception
                self.pos = self.fail_after
                raise ResponseStreamingError(error="Connection broken: IncompleteRead")
            end = self.fail_after
        chunk = self.data[self.pos : end]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        pass

    def __enter__(self) -> _Body:  # botocore's StreamingBody is a context manager too
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Client:
    def __init__(self, fail_at: list[int | None], etag: str = '"v1"') -> None:
        self.fail_at, self.etag, self.calls = list(fail_at), etag, []

    def get_object(self, Bucket, Key, Range=None, IfMatch=None):  # noqa: N803 - boto3's names
        self.calls.append((Range, IfMatch))
        if IfMatch is not None and IfMatch != self.etag:
            raise ClientError(
                {"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}}, "G"
            )
        start = int(Range.removeprefix("bytes=").rstrip("-")) if Range else 0
        fail = self.fail_at.pop(0) if self.fail_at else None
        return {"Body": _Body(DATA[start:], None if fail is None else fail - start), "ETag": self.etag}


def test_a_body_that_breaks_off_is_resumed_where_it_stopped(monkeypatch):
    """Issue 15 item 7: two drops mid-body; the reader asks for the rest, pinned to the first ETag (before: the
    ResponseStreamingError reached the tar reader and the training worker died)."""
    client = _Client([300_000, 700_001, None])
    monkeypatch.setattr(storage, "s3_client", lambda: client)
    monkeypatch.setattr(s3.time, "sleep", lambda s: None)
    with storage.open_read("s3://b/shard.tar") as stream:
        assert stream.read() == DATA
    assert client.calls == [(None, None), ("bytes=300000-", '"v1"'), ("bytes=700001-", '"v1"')]


def test_read_bytes_retries_a_body_that_breaks_off(monkeypatch):
    client = _Client([5000, None])
    monkeypatch.setattr(storage, "s3_client", lambda: client)
    monkeypatch.setattr(s3.time, "sleep", lambda s: None)
    assert storage.read_bytes("s3://b/k") == DATA


def test_an_object_replaced_while_read_is_not_spliced(monkeypatch):
    client = _Client([1000, None])
    monkeypatch.setattr(storage, "s3_client", lambda: client)
    monkeypatch.setattr(s3.time, "sleep", lambda s: None)
    stream = storage.open_read("s3://b/k")
    client.etag = '"v2"'  # someone wrote a new version
    with pytest.raises(storage.StorageError, match="at byte 1000"):
        stream.read()
