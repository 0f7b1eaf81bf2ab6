"""One storage interface over local paths and ``s3://bucket/key`` URIs.

Every stage reads and writes through these functions, so the same command works on a laptop directory, the
local SeaweedFS stack and AWS S3. S3 settings come only from the standard variables boto3 reads itself
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, AWS config files).

Guarantees:
- writes are atomic: a reader sees the old object or the whole new one, never a prefix (temp file + rename
  locally; a single PUT, or a multipart upload that only becomes visible when completed, on S3);
- transient failures (throttling, 5xx, refused or dropped connections, e.g. a server restart) are retried
  with exponential backoff for up to ``RETRY_SECONDS``; auth failures raise :class:`StorageAuthError` at once
  (the S3 client and that policy are :mod:`pipeline.s3`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from pipeline.s3 import RETRY_SECONDS as RETRY_SECONDS  # re-exported: callers know one storage module
from pipeline.s3 import StorageAuthError as StorageAuthError
from pipeline.s3 import StorageError, classify, retry, s3_client

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 16 * 1024 * 1024  # bytes; larger uploads go multipart
MULTIPART_CHUNK = 8 * 1024 * 1024


# ----------------------------------------------------------------------------------------------- URIs
def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


# ----------------------------------------------------------------------------------------------- operations
def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole object/file. Raises FileNotFoundError if it does not exist."""
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    return retry(f"read {uri}", lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def open_read(uri: str | os.PathLike) -> IO[bytes]:
    """A streaming binary reader (S3: the response body, read as it arrives; a body that breaks off halfway is
    resumed where it stopped, see :class:`_ResumingS3Reader`)."""
    uri = str(uri)
    if not is_s3(uri):
        return open(uri, "rb")  # noqa: SIM115 - the caller owns the handle
    return io.BufferedReader(_ResumingS3Reader(uri), buffer_size=1024 * 1024)


class _ResumingS3Reader(io.RawIOBase):
    """An S3 object read as one stream that survives dropped connections.

    A GET body can fail halfway (connection reset, a server restart, a read timeout). Instead of failing the whole
    read, the reader asks again for the rest (``Range: bytes=POS-``) with the usual backoff, pinned to the ETag of
    the first response (``If-Match``) so that the bytes never splice two versions of an object. It gives up with
    :class:`StorageError` after :data:`MAX_RESUMES` resumes that made no progress.
    """

    MAX_RESUMES = 5

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.position = 0
        self.etag: str | None = None
        self.body = self._open()

    def _open(self):
        def get():
            extra = {"Range": f"bytes={self.position}-", "IfMatch": self.etag} if self.position else {}
            return s3_client().get_object(Bucket=self.bucket, Key=self.key, **extra)

        response = retry(f"open {self.uri}" + (f" at byte {self.position}" if self.position else ""), get)
        self.etag = self.etag or response.get("ETag")
        return response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        fails = 0
        while True:
            try:
                data = self.body.read(len(buffer))
                break
            except Exception as exc:
                fails += 1
                if classify(exc) != "transient" or fails > self.MAX_RESUMES:
                    raise StorageError(f"read {self.uri} at byte {self.position}: {type(exc).__name__}: {exc}") from exc
                log.warning("read %s broke off at byte %d (%s); resuming", self.uri, self.position, type(exc).__name__)
                with contextlib.suppress(Exception):
                    self.body.close()
                self.body = self._open()
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self.body.close()
        super().close()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write atomically (see module docstring)."""
    _write(str(uri), lambda: io.BytesIO(data))


def write_file(uri: str | os.PathLike, local_path: str | os.PathLike) -> None:
    """Upload/copy a local file to ``uri`` atomically."""
    _write(str(uri), lambda: open(local_path, "rb"))  # noqa: SIM115 - closed by _write


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def create_text(uri: str | os.PathLike, text: str) -> bool:
    """Write ``text`` to ``uri`` only if nothing is there, atomically; True when this call created it.

    Of several writers racing for one ``uri`` exactly one gets True (locally a hard link, which fails if the name
    exists; on S3 a PUT with ``If-None-Match: *``, answered 412 when the object exists). A retried PUT whose first
    attempt did land also gets False: callers compare what is there with what they meant to write.
    """
    uri, data = str(uri), text.encode("utf-8")
    if not is_s3(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
    bucket, key = split_s3(uri)
    try:
        retry(f"create {uri}", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"))
        return True
    except StorageError as exc:
        response = getattr(exc.__cause__, "response", {})
        if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:  # PreconditionFailed: it exists
            return False
        raise


@contextlib.contextmanager
def open_write(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write ``uri`` through, for objects too large to hold in memory; atomic like every write.

    What the block writes goes to a temp file (locally beside ``uri``, renamed over it; for S3 under ``TMPDIR``,
    uploaded with retries like :func:`write_file`) when the block ends; if the block raises, nothing is written.
    """
    uri = str(uri)
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="lp-write-") as tmp:
            path = os.path.join(tmp, "object")
            with open(path, "wb") as out:
                yield out
            write_file(uri, path)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write(uri: str, opener: Callable[[], IO[bytes]]) -> None:
    """Write what ``opener()`` yields atomically; large S3 objects go multipart (visible only once complete).

    ``opener`` is called once per attempt: boto3 closes the stream when an upload fails, so a retry needs a new one.
    """
    if not is_s3(uri):
        with open_write(uri) as out, opener() as src:  # temp file beside the target, fsync, rename
            shutil.copyfileobj(src, out, 1024 * 1024)
        return
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3(uri)
    transfer = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK, use_threads=False
    )

    def upload() -> None:
        with opener() as src:  # an incomplete multipart upload is aborted by boto3 before it raises
            s3_client().upload_fileobj(src, bucket, key, Config=transfer)

    retry(f"write {uri}", upload)


def exists(uri: str | os.PathLike) -> bool:
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    try:
        retry(f"stat {uri}", lambda: s3_client().head_object(Bucket=bucket, Key=key))
        return True
    except FileNotFoundError:
        return False


def size(uri: str | os.PathLike) -> int:
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).stat().st_size
    bucket, key = split_s3(uri)
    return int(retry(f"stat {uri}", lambda: s3_client().head_object(Bucket=bucket, Key=key))["ContentLength"])


def list_uris(prefix: str | os.PathLike, recursive: bool = True) -> Iterator[str]:
    """Every object/file under ``prefix`` (a directory or key prefix), sorted, following S3 pagination."""
    prefix = str(prefix)
    if not is_s3(prefix):
        root = Path(prefix)
        if not root.exists():
            return
        pattern = "**/*" if recursive else "*"
        for path in sorted(root.glob(pattern)):
            if path.is_file() and not path.name.startswith("."):
                yield str(path)
        return
    bucket, key_prefix = split_s3(prefix)
    if key_prefix and not key_prefix.endswith("/"):
        key_prefix += "/"
    token: str | None = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": key_prefix}
        if not recursive:
            kwargs["Delimiter"] = "/"
        if token:
            kwargs["ContinuationToken"] = token
        page = retry(f"list {prefix}", lambda kw=kwargs: s3_client().list_objects_v2(**kw))
        for obj in page.get("Contents", []):
            yield f"s3://{bucket}/{obj['Key']}"
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


def delete(uri: str | os.PathLike) -> None:
    """Remove one object/file; missing is fine."""
    uri = str(uri)
    if not is_s3(uri):
        Path(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    retry(f"delete {uri}", lambda: s3_client().delete_object(Bucket=bucket, Key=key))


def delete_prefix(prefix: str | os.PathLike) -> int:
    """Remove everything under ``prefix``; returns how many objects/files went."""
    prefix = str(prefix)
    if not is_s3(prefix):
        count = sum(1 for _ in list_uris(prefix))
        shutil.rmtree(prefix, ignore_errors=True)
        return count
    bucket, _ = split_s3(prefix)
    keys = [split_s3(u)[1] for u in list_uris(prefix)]
    for i in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
        retry(f"delete {prefix}", lambda b=batch: s3_client().delete_objects(Bucket=bucket, Delete=b))
    return len(keys)


# ----------------------------------------------------------------------------------------------- WebDataset
class _S3WriteBuffer(io.BytesIO):
    """What ``gopen("s3://...", "wb")`` returns: buffers in memory, uploads atomically on close."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri

    def close(self) -> None:
        if not self.closed:
            write_bytes(self.uri, self.getvalue())
        super().close()


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: object) -> IO[bytes]:
    if mode == "rb":
        return open_read(url)
    if mode == "wb":
        return _S3WriteBuffer(url)
    raise ValueError(f"gopen s3: unsupported mode {mode}")


def register_webdataset() -> None:
    """Teach ``webdataset.gopen`` the ``s3://`` scheme so ``wds.WebDataset("s3://...")`` streams shards.

    Call it in every process that opens shards (Ray workers and DataLoader workers inherit nothing).
    """
    import sys

    import webdataset  # noqa: F401 - importing it makes the gopen module available

    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = _gopen_s3
