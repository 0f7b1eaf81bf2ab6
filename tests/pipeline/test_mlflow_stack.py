"""The MLflow server of the local stack stores run artifacts as objects in the S3 bucket."""

from __future__ import annotations

import re
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


@pytest.mark.parametrize("quoted", ["s3://b/ckpt/o'neil's run", 's3://b/ckpt/say "hi" \\ it\'s'])
def test_run_keys_and_model_names_with_quotes_are_found(local_stack, quoted):
    """Issue 15 item 14: a ' (or ", or \\) in a run key or a model name used to end the filter's quoted value (the
    search failed); now it finds exactly that run and that model, not a look-alike that a LIKE pattern also matches."""
    import mlflow

    from pipeline import tracking

    mlflow.set_tracking_uri(local_stack.env["MLFLOW_TRACKING_URI"])
    experiment = f"test-quotes-{uuid.uuid4().hex[:6]}"
    look_alike = re.sub(r"['\"\\]", "x", quoted)  # what a LIKE with "_" for each quote would match too

    def left_running(run_key: str) -> tracking.Tracker:  # a run whose workers died before a checkpoint
        tracker = tracking.Tracker(enabled=True)
        tracker.start(experiment, "run", run_key=run_key, system_metrics=False)
        mlflow.end_run(status="RUNNING")
        return tracker

    first = left_running(quoted)
    left_running(look_alike)  # newer: the search's first hit when only the pattern is checked
    again = tracking.Tracker(enabled=True)
    again.start(experiment, "run", run_key=quoted, system_metrics=False)
    try:
        assert again.resumed and again.run_id == first.run_id
        name = f"{quoted.rsplit('/', 1)[1]} {uuid.uuid4().hex[:6]}"
        assert again.register(name, "model") == "1"
        for _ in range(2):  # a look-alike model with a newer version number
            again.register(re.sub(r"['\"\\]", "x", name), "model")
        client = mlflow.MlflowClient()
        assert tracking._newest_version(client, name) == "1"
        assert tracking.resolve_model_source(f"models:/{name}@latest").endswith("/model")
    finally:
        again.end()


def test_experiments_are_tagged_as_model_training(local_stack):
    """MLflow 3 opens an untagged experiment as GenAI (traces, runs under "Evaluations"); ours open on runs and
    charts. A kind someone set on an experiment since is left as it is."""
    import mlflow

    from pipeline import tracking

    mlflow.set_tracking_uri(local_stack.env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    name = f"test-kind-{uuid.uuid4().hex[:6]}"
    tracker = tracking.Tracker(enabled=True)
    tracker.start(name, "run", system_metrics=False)
    tracker.end()
    experiment = client.get_experiment_by_name(name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", "genai_development")
    again = tracking.Tracker(enabled=True)
    again.start(name, "run 2", system_metrics=False)
    again.end()
    assert client.get_experiment(experiment.experiment_id).tags["mlflow.experimentKind"] == "genai_development"
