"""Training over broken data on the real local stack (S3, MLflow, Ray head with 2 CPUs): a run reaches max_steps and
says in MLflow what it skipped (issue 15, training items)."""

from __future__ import annotations

import pytest

from pipeline import shards, storage

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def broken_dataset(local_stack, dataset_writer) -> str:
    """The training fixture's shards with train-000001 (rank 1's only shard) cut off in the middle of a member."""
    prefix = local_stack.s3_prefix("broken-data")
    out = dataset_writer(storage.join(prefix, "latents"), "preset:tiny")
    tar = shards.tar_uri(out, shards.shard_name("train", 1))
    data = storage.read_bytes(tar)
    storage.write_bytes(tar, data[: len(data) // 2 + 100])
    return out


def test_a_run_over_a_truncated_shard_reaches_max_steps_and_counts_what_it_skipped(
    local_stack, ray_on_stack, broken_dataset, train_config
) -> None:
    """Item 7: before, the truncated tar raised (KeyError 'json' / tarfile.ReadError) in the worker, Ray Train
    restarted it max_failures times and the run failed."""
    import mlflow

    from train.launch import launch

    cfg = train_config(
        "clap",
        broken_dataset,
        local_stack.s3_prefix("checkpoints"),
        "t-broken",
        run__max_steps=10,
        run__checkpoint_every=10,
        run__max_failures=1,
    )
    result = launch(cfg)
    assert result.error is None, result.error
    (run,) = mlflow.search_runs(
        experiment_names=["longplay-tests"], filter_string="tags.`mlflow.runName` = 't-broken'", output_format="list"
    )
    assert [s for s, _ in _history(run.info.run_id, "loss")] == [5, 10]
    skipped = _history(run.info.run_id, "skipped_samples")
    assert skipped[-1][0] == 10 and skipped[-1][1] > 0, skipped
