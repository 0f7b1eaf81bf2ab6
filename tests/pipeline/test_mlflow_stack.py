"""The MLflow server of the local stack stores run artifacts as objects in the S3 bucket."""

from __future__ import annotations

import uuid

import pytest

from pipeline import storage

pytestmark = pytest.mark.stack


def test_mlflow_artifact_lands_in_the_s3_bucket(local_stack, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(local_stack.env["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(f"test-{uuid.uuid4().hex[:6]}")
    artifact = tmp_path / "note.txt"
    token = uuid.uuid4().hex
    artifact.write_text(token)
    with mlflow.start_run() as run:
        mlflow.log_param("preset", "tiny")
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.log_artifact(str(artifact))
    objects = [u for u in storage.list_uris("s3://longplay/mlflow-artifacts") if run.info.run_id in u]
    assert [u.rsplit("/", 1)[1] for u in objects] == ["note.txt"]
    assert storage.read_text(objects[0]) == token
    got = mlflow.get_run(run.info.run_id)
    assert got.data.params == {"preset": "tiny"} and got.data.metrics == {"loss": 0.5}
