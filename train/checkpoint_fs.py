"""The filesystem Ray Train uploads checkpoints through: pyarrow's S3 whose retries survive the trip to the workers.

Ray Train pickles ``RunConfig(storage_filesystem=...)`` to its controller and workers, and a pickled
``pyarrow.fs.S3FileSystem`` comes back with its endpoint and region but not its ``retry_strategy`` (it is not part of
what the object reduces to), so every checkpoint upload ran with pyarrow's default of 3 tries: a restart of the S3
server during an upload lost the checkpoint and, after ``max_failures``, the run. :class:`RetryingS3FileSystem` is
that filesystem with a reduction of its own, so each process rebuilds it with the retry strategy. It stays an
``S3FileSystem`` rather than a ``PyFileSystem`` wrapper: Ray Train recognises it as S3 and uploads as before (one
thread, native streams); a wrapper made our checkpoint uploads about 20% slower (Ray copies through it threaded).
"""

from __future__ import annotations

from typing import Any

from pyarrow import fs

# The AWS SDK's standard backoff waits a random time up to 2**k s before retry k, capped at 20 s: 11 tries gave up
# after 95-110 s against a closed port (3 tries: 1.7 s), like pipeline.storage.RETRY_SECONDS (90 s, long enough to
# ride out a restart of the S3 server).
S3_ATTEMPTS = 11


class RetryingS3FileSystem(fs.S3FileSystem):
    """``S3FileSystem`` retrying each request up to ``attempts`` times (``AwsStandardS3RetryStrategy``), also after
    pickling. Credentials come from the environment of the process that uses it, as with ``S3FileSystem``."""

    def __init__(
        self, region: str, endpoint_override: str | None = None, scheme: str = "https", attempts: int = S3_ATTEMPTS
    ) -> None:
        self.settings = (region, endpoint_override, scheme, attempts)
        options: dict[str, Any] = {"region": region, "scheme": scheme}
        if endpoint_override:
            options["endpoint_override"] = endpoint_override
        super().__init__(retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=attempts), **options)

    @property
    def attempts(self) -> int:
        return self.settings[3]

    def __reduce__(self) -> tuple[Any, ...]:  # the settings, retries included: rebuilt where it lands
        return (RetryingS3FileSystem, self.settings)
