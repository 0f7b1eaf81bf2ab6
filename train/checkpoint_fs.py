"""The filesystem Ray Train uploads checkpoints through: pyarrow's S3 whose retries survive the trip to the workers.

Ray Train pickles ``RunConfig(storage_filesystem=...)`` to its controller and workers, and a pickled
``pyarrow.fs.S3FileSystem`` comes back with its endpoint and region but not its ``retry_strategy`` (it is not part of
what the object reduces to), so every checkpoint upload ran with pyarrow's default of 3 tries: a restart of the S3
server during an upload lost the checkpoint and, after ``max_failures``, the run. Here Ray gets a
``pyarrow.fs.PyFileSystem`` around :class:`RetryingS3`, a handler that pickles as its plain settings and builds the
real ``S3FileSystem``, retry strategy included, once in each process that uses it. Files are still streamed by
pyarrow's own S3 code (the handler returns its native streams), so an upload costs what it did.
"""

from __future__ import annotations

import threading
from typing import Any

from pyarrow import fs

# The AWS SDK's standard backoff waits a random time up to 2**k s before retry k, capped at 20 s: 11 tries span about
# 100 s on average, like pipeline.storage.RETRY_SECONDS (90 s, long enough to ride out a restart of the S3 server).
S3_ATTEMPTS = 11


class RetryingS3(fs.FileSystemHandler):
    """A ``pyarrow.fs.FileSystemHandler`` over an ``S3FileSystem`` retrying each request up to ``attempts`` times
    (``AwsStandardS3RetryStrategy``) and keeps ``attempts`` through pickling; for ``pyarrow.fs.PyFileSystem``."""

    def __init__(
        self, region: str, endpoint_override: str | None = None, scheme: str = "https", attempts: int = S3_ATTEMPTS
    ) -> None:
        self.region, self.endpoint_override, self.scheme, self.attempts = region, endpoint_override, scheme, attempts
        self._fs: fs.S3FileSystem | None = None
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:  # the settings only: the S3 client is rebuilt where it lands
        return (RetryingS3, (self.region, self.endpoint_override, self.scheme, self.attempts))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingS3) and self.__reduce__() == other.__reduce__()

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.__reduce__()[1])

    @property
    def s3(self) -> fs.S3FileSystem:
        """This process's ``S3FileSystem`` (built on first use)."""
        with self._lock:
            if self._fs is None:
                options: dict[str, Any] = {"region": self.region, "scheme": self.scheme}
                if self.endpoint_override:
                    options["endpoint_override"] = self.endpoint_override
                retry = fs.AwsStandardS3RetryStrategy(max_attempts=self.attempts)
                self._fs = fs.S3FileSystem(retry_strategy=retry, **options)
            return self._fs

    # Every call goes to the S3FileSystem as it is: pyarrow's semantics for S3 "directories" stay pyarrow's.
    def get_type_name(self) -> str:
        return "s3+retries"

    def normalize_path(self, path: str) -> str:
        return self.s3.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[fs.FileInfo]:
        return self.s3.get_file_info(paths)

    def get_file_info_selector(self, selector: fs.FileSelector) -> list[fs.FileInfo]:
        return self.s3.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.s3.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.s3.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.s3.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.s3.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.s3.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.s3.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.s3.copy_file(src, dest)

    def open_input_stream(self, path: str):
        return self.s3.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.s3.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None):
        return self.s3.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict[str, str] | None):
        return self.s3.open_append_stream(path, metadata=metadata)


def s3_filesystem(region: str, endpoint_override: str | None = None, scheme: str = "https") -> fs.PyFileSystem:
    """The checkpoint filesystem for Ray Train's ``RunConfig(storage_filesystem=...)``."""
    return fs.PyFileSystem(RetryingS3(region, endpoint_override, scheme))
