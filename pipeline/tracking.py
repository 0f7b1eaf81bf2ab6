"""MLflow tracking, from rank 0 only: params, tags, metrics, artifacts, registered models.

A :class:`Tracker` built with ``enabled=False`` (every rank but 0) turns every call into a no-op, so training loops
call it unconditionally. The tracking server comes only from ``MLFLOW_TRACKING_URI`` (and artifacts on S3 from the
standard AWS variables); nothing secret is ever logged: params are the resolved config, which holds URIs only.

A resumed run passes the MLflow run id stored in its checkpoint back to :meth:`Tracker.start`, so a restart
continues the same MLflow run instead of opening a duplicate.

Model URIs: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME/latest`` (the newest version) and, as
a convenience, ``models:/NAME@latest`` (MLflow reserves the alias name ``latest``, so it means the newest version
too); :func:`download_model` resolves any of them, an s3:// prefix or a local directory to a local directory.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline import storage
from pipeline.config import flatten

log = logging.getLogger(__name__)

REGISTERED_ALIAS = "current"  # MLflow rejects the alias name "latest"; models:/NAME@latest resolves to the newest
MAX_PARAM_CHARS = 500
RUN_KEY_TAG = "longplay.run_key"
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

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self.resumed = False

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

        experiment_id = mlflow.set_experiment(experiment).experiment_id
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
        if not self.enabled:
            return
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if clean:
            mlflow.log_metrics(clean, step=step)

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


def download_model(uri: str, dst: str | os.PathLike | None = None) -> Path:
    """A local directory holding the export at ``uri`` (models:/…, runs:/…, s3:// prefix, or a local dir)."""
    if not uri.startswith(("models:/", "runs:/")) and not storage.is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise FileNotFoundError(uri)
        return path
    dst = Path(dst or tempfile.mkdtemp(prefix="longplay-model-"))
    dst.mkdir(parents=True, exist_ok=True)
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
