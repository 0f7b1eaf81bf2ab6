"""MLflow tracking, from rank 0 only: params, tags, metrics, artifacts, registered models.

A :class:`Tracker` built with ``enabled=False`` (every rank but 0) turns every call into a no-op, so training loops
call it unconditionally. The tracking server comes only from ``MLFLOW_TRACKING_URI`` (and artifacts on S3 from the
standard AWS variables); nothing secret is ever logged: params are the resolved config, which holds URIs only.

A resumed run passes the MLflow run id stored in its checkpoint back to :meth:`Tracker.start`, so a restart
continues the same MLflow run instead of opening a duplicate.

Metrics never hold training up. :meth:`Tracker.log_metrics` only queues them; a background thread sends them to the
run in batches. While the server is unreachable (past the client's own retries) they wait in memory and go out when it
is back, in the same run; past :attr:`Tracker.MAX_BUFFERED` values the oldest are dropped with a warning.
:meth:`Tracker.end` waits up to :attr:`Tracker.FLUSH_AT_END_S` for the queue to drain.

Model URIs: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME/latest`` (the newest version) and, as
a convenience, ``models:/NAME@latest`` (MLflow reserves the alias name ``latest``, so it means the newest version
too); :func:`download_model` resolves any of them, an s3:// prefix or a local directory to a local directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline import storage
from pipeline.config import flatten

log = logging.getLogger(__name__)

REGISTERED_ALIAS = "current"  # MLflow rejects the alias name "latest"; models:/NAME@latest resolves to the newest
MAX_PARAM_CHARS = 500
RUN_KEY_TAG = "longplay.run_key"
# The MLflow UI opens an experiment by its kind; without this tag MLflow 3 shows ours as GenAI (traces, "Evaluations").
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
EXPORT_POINTER = "EXPORT.json"  # in a run's export/: names the complete versioned export (train/loop.publish_export)
EXPORTS_DIR = "exports"
WEIGHTS_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # a URI ending so names one weights file
_FILTER_UNSAFE = re.compile(r"['\"\\]")  # what ends or escapes a quoted value in an MLflow filter


def git_sha(cwd: str | os.PathLike | None = None) -> str:
    """The repository's commit (with ``-dirty`` when there are local changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def filter_equals(field: str, value: str) -> str:
    """A clause of an MLflow search filter that matches ``field = value`` for any string (and maybe more: see below).

    MLflow's filter grammar has no escapes: a quoted value ends at its next quote (a ``'`` in a run key broke the
    search), and inside ``'...'`` a final backslash swallows the quote. A value without ``"`` is double-quoted
    (MLflow reads "..." as a string; ``'`` and ``\\`` are plain there). A value holding ``"`` becomes a LIKE in which
    every quote and backslash is ``_`` (any one character). That, and case-insensitive collations of some SQL
    backends, may match other values too: callers keep only the results whose value is ``value``.
    """
    if '"' not in value:
        return f'{field} = "{value}"'
    pattern = _FILTER_UNSAFE.sub("_", value)
    return f"{field} LIKE '{pattern}'"


class Tracker:
    """One MLflow run, written only where ``enabled`` (rank 0)."""

    MAX_BUFFERED = 1_000_000  # metric values held while the server is away (~100 bytes each)
    FLUSH_AT_END_S = 300.0  # how long end() waits for queued metrics: longer than the client's own retries
    BATCH = 1000  # values per request (MLflow's log_batch limit)

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self.resumed = False
        self.dropped = 0  # metric values dropped because the queue was full
        self._queue: deque[tuple[int, Any]] = deque()  # (sequence number, mlflow Metric)
        self._sequence = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None

    def start(
        self,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        run_key: str | None = None,
        system_metrics: bool = True,
    ) -> None:
        """Open a new run, or reopen ``run_id`` (a resumed training run).

        Without ``run_id``, a still-RUNNING run tagged with the same ``run_key`` (e.g. the checkpoint directory) is
        reopened: that is a run whose workers died before its first checkpoint, so its restart continues it.
        """
        if not self.enabled:
            return
        import mlflow

        found = mlflow.set_experiment(experiment)
        experiment_id = found.experiment_id
        if EXPERIMENT_KIND_TAG not in found.tags:  # ours, so it opens on runs and charts; a kind set since is kept
            mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if run_id is None and run_key is not None:
            found = mlflow.search_runs(
                experiment_ids=[experiment_id],
                filter_string=f"{filter_equals(f'tags.`{RUN_KEY_TAG}`', run_key)} and attributes.status = 'RUNNING'",
                order_by=["attributes.start_time DESC"],
                max_results=100,
                output_format="list",
            )
            found = [r for r in found if r.data.tags.get(RUN_KEY_TAG) == run_key]
            run_id = found[0].info.run_id if found else None
        self.resumed = run_id is not None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        if run_key is not None:
            mlflow.set_tag(RUN_KEY_TAG, run_key)

    def log_config(self, cfg: BaseModel) -> None:
        """The resolved config as params (once: a resumed run already has them and MLflow forbids changing one)."""
        if not self.enabled or self.resumed:
            return
        import mlflow

        params = {k: str(v)[:MAX_PARAM_CHARS] for k, v in flatten(cfg).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
            mlflow.log_params(dict(items[i : i + 100]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        """Queue finite values for the run (sent in the background; returns at once, whether or not MLflow is up)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        timestamp = int(time.time() * 1000)
        with self._lock:
            for key, value in clean.items():
                self._sequence += 1
                self._queue.append((self._sequence, Metric(key, value, timestamp, step)))
            overflow = len(self._queue) - self.MAX_BUFFERED
            for _ in range(max(0, overflow)):
                self._queue.popleft()
            if overflow > 0:
                if not self.dropped:
                    log.warning("MLflow unreachable: metric queue full (%d); dropping the oldest", self.MAX_BUFFERED)
                self.dropped += overflow
        if self._sender is None and self.run_id is not None:
            self._sender = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
            self._sender.start()
        self._wake.set()

    def _send_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            while self._send_batch():
                failures = 0
            if self.pending():  # the server is away: wait before the next try (a new value wakes us sooner)
                failures += 1
                self._stop.wait(min(30.0, 0.5 * 2**failures))
                self._wake.set()

    def _send_batch(self) -> bool:
        """Send up to :attr:`BATCH` queued values; True when some went out."""
        from mlflow import MlflowClient

        with self._lock:
            batch = [self._queue[i] for i in range(min(self.BATCH, len(self._queue)))]
        if not batch:
            return False
        from mlflow.exceptions import MlflowException

        try:
            MlflowClient().log_batch(self.run_id, metrics=[metric for _, metric in batch])
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server: keep the values, try later
            status = exc.get_http_status_code() if isinstance(exc, MlflowException) else 0
            if not (400 <= status < 500 and status != 429):
                log.warning("MLflow: %d metric values wait for the server (%s)", self.pending(), type(exc).__name__)
                return False
            log.warning("MLflow refused %d metric values, dropped: %s", len(batch), exc)  # retrying cannot help
        with self._lock:  # values dropped meanwhile left from the front; remove what was sent, by sequence number
            sent = batch[-1][0]
            while self._queue and self._queue[0][0] <= sent:
                self._queue.popleft()
        return True

    def pending(self) -> int:
        """Metric values queued and not yet sent."""
        with self._lock:
            return len(self._queue)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every queued value to be sent; True when none is left."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        return not self.pending()

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        import mlflow

        mlflow.log_artifact(str(local_path), artifact_path=artifact_path)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        import mlflow

        mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)

    def register(self, name: str, artifact_path: str, alias: str = REGISTERED_ALIAS) -> str | None:
        """Register the artifacts at ``artifact_path`` of this run as a new version of ``name`` and point ``alias``
        (and the tag ``latest=true``) at it. Returns the version."""
        if not self.enabled:
            return None
        import mlflow
        from mlflow.exceptions import MlflowException

        client = mlflow.MlflowClient()
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        source = f"{mlflow.get_run(self.run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        version = client.create_model_version(name, source=source, run_id=self.run_id).version
        client.set_registered_model_alias(name, alias, version)
        client.set_model_version_tag(name, version, "latest", "true")
        return str(version)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run (``FINISHED``; a failing rank leaves it open so the restart can continue it)."""
        if not self.enabled or self.run_id is None:
            return
        import mlflow

        if not self.flush(self.FLUSH_AT_END_S):
            log.warning("MLflow: dropping %d metric values the server did not take", self.pending())
        self._stop.set()
        self._wake.set()
        if self.dropped:
            log.warning("MLflow: %d metric values were dropped while the server was unreachable", self.dropped)
        mlflow.end_run(status=status)


# ----------------------------------------------------------------------------------------------- model URIs
def resolve_model_source(uri: str) -> str:
    """``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``models:/NAME/latest`` → the artifact URI it points to."""
    import mlflow

    client = mlflow.MlflowClient()
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        if alias.lower() == "latest":
            version = _newest_version(client, name)
        else:
            version = client.get_model_version_by_alias(name, alias).version
    elif "/" in body:
        name, version = body.split("/", 1)
        if version.lower() == "latest":
            version = _newest_version(client, name)
    else:
        raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version_download_uri(name, str(version))


def _newest_version(client: Any, name: str) -> str:
    versions = [v for v in client.search_model_versions(filter_equals("name", name)) if v.name == name]
    if not versions:
        raise FileNotFoundError(f"models:/{name}: no registered versions")
    return str(max(int(v.version) for v in versions))


def resolve_export(uri: str) -> str:
    """A training run's ``export`` folder → the complete versioned export its ``EXPORT.json`` names; any other URI
    (or an export written before the pointer existed) as it is."""
    base = uri.rstrip("/")
    if uri.startswith(("models:/", "runs:/")) or base.rsplit("/", 1)[-1] != "export":
        return uri
    try:
        pointer = json.loads(storage.read_text(storage.join(uri, EXPORT_POINTER)))
    except (FileNotFoundError, NotADirectoryError):
        return uri
    folder = str(pointer.get("folder", ""))
    if not re.fullmatch(rf"{EXPORTS_DIR}/[0-9A-Za-z-]+", folder):  # data, not a path of its choosing
        raise storage.StorageError(f"{uri}/{EXPORT_POINTER}: folder {folder!r} is not {EXPORTS_DIR}/VERSION")
    parent = base.rsplit("/", 1)[0] if storage.is_s3(base) else str(Path(base).parent)
    return storage.join(parent, *folder.split("/"))


def download_model(uri: str, dst: str | os.PathLike | None = None) -> Path:
    """The one URI → local path function: a local directory holding the export at ``uri`` (models:/…, runs:/…,
    s3:// prefix, or a local dir; an s3:// or local weights file gives that file). A training run's ``export``
    folder is resolved through its pointer first (:func:`resolve_export`). Remote URIs are copied into ``dst``
    (default: a new temp dir); a local path is returned as it is."""
    uri = resolve_export(uri)
    if not uri.startswith(("models:/", "runs:/")) and not storage.is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise FileNotFoundError(uri)
        return path
    dst = Path(dst or tempfile.mkdtemp(prefix="longplay-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    if storage.is_s3(uri) and uri.endswith(WEIGHTS_SUFFIXES):  # one weights file (a checkpoint), not a folder
        path = dst / uri.rsplit("/", 1)[-1]
        path.write_bytes(storage.read_bytes(uri))
        return path
    if storage.is_s3(uri):
        prefix = uri.rstrip("/")
        objs = [obj for obj in storage.list_uris(prefix) if not obj.endswith("/")]  # not folder markers
        files = {obj: _inside(dst, obj[len(prefix) + 1 :], obj) for obj in objs}
        for obj, path in files.items():  # every key checked before the first byte is written
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(storage.read_bytes(obj))
        return dst
    import mlflow

    source = resolve_model_source(uri) if uri.startswith("models:/") else uri
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))


def _inside(root: Path, rel: str, obj: str) -> Path:
    """``root / rel``, refused when the key's ``..``, a leading ``/`` or a link in ``root`` lead elsewhere: an S3 key
    is data, and ``model/../../x`` must not choose where a download writes."""
    path = (root / rel).resolve()
    if not rel or not path.is_relative_to(root.resolve()) or path == root.resolve():
        raise storage.StorageError(f"{obj}: the key leads outside the download folder {root}; refusing to download")
    return path
