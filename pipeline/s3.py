"""The S3 client and its failure policy, under :mod:`pipeline.storage`: which errors are transient (retried with
exponential backoff and jitter for up to ``RETRY_SECONDS``), which mean bad credentials (:class:`StorageAuthError`
at once, naming the variables to check, never a secret) and which mean the object is missing (FileNotFoundError).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

RETRY_SECONDS = 90.0  # long enough to ride out a restart of the S3 server
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
    "ConditionalRequestConflict",  # 409: a conditional write raced another write of the key; AWS says retry
}
_AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "ExpiredToken", "InvalidToken"}


class StorageError(RuntimeError):
    """A storage operation failed for good (after retries, or for a non-transient reason)."""


class StorageAuthError(StorageError):
    """The object store rejected our credentials; the message names the variables to check, never a secret."""


T = TypeVar("T")


# ----------------------------------------------------------------------------------------------- S3 client
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _env_key() -> tuple:
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
    return (os.getpid(), *(os.environ.get(n) for n in names))


def s3_client():
    """A boto3 S3 client for the current environment (cached per process and per credential set)."""
    key = _env_key()
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            # botocore's own retries are kept short: our wrapper owns the long backoff so that a
            # restart of the server is survived by every operation the same way.
            cfg = Config(
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"},
                signature_version="s3v4",
            )
            client = boto3.session.Session().client("s3", config=cfg)
            _clients[key] = client
    return client


def classify(exc: BaseException) -> str:
    """'auth', 'missing', 'transient' or 'fatal'."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "auth"
    dropped = ResponseStreamingError | IncompleteReadError  # a body that broke off halfway: read it again
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError | ReadTimeoutError | BotoConnectionError):
        return "transient"
    if isinstance(exc, dropped):
        return "transient"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _AUTH_CODES or status == 403:
            return "auth"
        if code in {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}:
            return "missing"
        if code in _TRANSIENT_CODES or status >= 500:
            return "transient"
        return "fatal"
    if isinstance(exc, ConnectionError | TimeoutError):
        return "transient"
    return "fatal"


def retry(what: str, fn: Callable[[], T], deadline_s: float = RETRY_SECONDS) -> T:
    """Run ``fn`` retrying transient S3 failures with exponential backoff and jitter until ``deadline_s``."""
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn()
        except Exception as exc:
            kind = classify(exc)
            if kind == "missing":
                raise FileNotFoundError(what) from exc
            if kind == "auth":
                code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
                raise StorageAuthError(
                    f"{what}: the object store rejected the credentials ({code}); "
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL"
                ) from None
            elapsed = time.monotonic() - start
            if kind != "transient" or elapsed > deadline_s:
                raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc
            attempt += 1
            pause = min(8.0, 0.25 * 2**attempt) * (0.5 + random.random())
            log.warning("%s: transient %s, retry %d in %.1fs", what, type(exc).__name__, attempt, pause)
            time.sleep(pause)
