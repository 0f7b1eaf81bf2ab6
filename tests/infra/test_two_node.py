"""A real two-node Ray cluster on this machine: the session stack's head plus a node started by `longplay stack join`
(its own raylet, object store, agents, ports and temp dir; both on 127.0.0.1; token auth on). `longplay submit` runs
preprocessing and diffusion training on it, the work lands on both nodes, and the joined node is SIGKILLed mid-training:
the run finishes on the head from its last registered checkpoint.

Both nodes share 127.0.0.1 rather than living in network namespaces with addresses of their own: Ray binds all
interfaces for any node IP other than 127.0.0.1, and the stack's S3 and MLflow listen on the host's loopback, which
another namespace cannot reach (docs/architecture.md, "A local two-node cluster").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

from infra import raynode, stack
from pipeline import storage

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SR = 44100
CAPTIONS = ("low drone", "middle tone", "high whistle", "buzzing pulse")
EXPERIMENT = "longplay-tests"
MAX_STEPS = 150  # ~5 steps/s here: leaves tens of seconds between the first checkpoint and the end


# ----------------------------------------------------------------------------------------------- helpers
class Submit:
    """`longplay submit -- longplay ARGV...` (the README runbook's command) in its own process group, its output in
    files (a pipe could fill up with the job's logs while the test waits on something else)."""

    def __init__(self, logs: Path, *argv: str):
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        cmd = [sys.executable, "-m", "infra.cli", "submit", "--", "longplay", *argv]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, start_new_session=True)

    def job_id(self) -> str:
        return self.err.read_text().partition("submitted job ")[2].split("\n")[0].strip()

    def logs(self) -> str:
        return f"{self.out.read_text()[-3000:]}\n{self.err.read_text()[-3000:]}"

    def finish(self, timeout: float) -> str:
        """Wait; assert the job SUCCEEDED; return its submission id."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        assert self.proc.returncode == 0 and ": SUCCEEDED" in self.err.read_text(), self.logs()
        return self.job_id()

    def kill(self) -> None:
        """Stop the submit and its job (so a failed test stops writing to the shared stack)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            if self.job_id():
                from pipeline import cluster

                cluster.job_client().stop_job(self.job_id())


def _state(job_client):
    """Ray's state API and the stack's dashboard address (token auth through the variables `pipeline.cluster` set)."""
    from ray.util import state

    return state, job_client.get_address()


def _actors(job_client, submission_id: str, class_name: str) -> list:
    """Actors of class ``class_name`` created by the job (dead ones included: Ray keeps their node ids)."""
    state, address = _state(job_client)
    job_id = job_client.get_job_info(submission_id).job_id
    if job_id is None:  # the driver has not started yet
        return []
    filters = [("job_id", "=", job_id), ("class_name", "=", class_name)]
    return state.list_actors(address=address, filters=filters, limit=1000, raise_on_missing_output=False)


def _history(run_name: str, key: str) -> tuple[int, list[tuple[int, float]]]:
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT], filter_string=f"tags.`mlflow.runName` = '{run_name}'", output_format="list"
    )
    if not runs:
        return 0, []
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, key)
    return len(runs), sorted((m.step, m.value) for m in history)


def _raw_audio(prefix: str, tmp: Path) -> None:
    """8 clips of 2-3 s (4 audible classes, stereo 44.1 kHz and mono 22.05 kHz mixed) + manifest on S3."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        caption = CAPTIONS[i % 4]
        rate = SR if i % 2 else 22050
        t = np.arange(int(rate * rng.uniform(2.0, 3.0))) / rate
        audio = 0.4 * np.sin(2 * np.pi * 110.0 * (1 + i % 4) * t) + 0.01 * rng.standard_normal(t.shape)
        sf.write(tmp / f"clip{i:02d}.wav", np.stack([audio, audio], 1) if i % 2 else audio, rate)
        rows.append({"path": f"clip{i:02d}.wav", "caption": caption})
    (tmp / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in sorted(tmp.iterdir()):
        storage.write_file(f"{prefix}/{path.name}", path)


def _clap_export(uri: str) -> None:
    """A freshly initialised tiny CLAP export (what `longplay train clap` registers; diffusion only needs it frozen)."""
    from pipeline.models.clap import build_clap
    from pipeline.text import train_tokenizer
    from train.components import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, save_weights

    tokenizer = train_tokenizer(list(CAPTIONS) * 4)
    clap = build_clap("tiny", vocab_size=tokenizer.vocab_size)
    config = {"kind": "clap", "preset": "tiny", "vocab_size": tokenizer.vocab_size}
    config |= {"latent_channels": 64, "latent_rate": SR / 1024}
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(clap.state_dict(), Path(tmp) / WEIGHTS_FILE)
        tokenizer.save(Path(tmp) / TOKENIZER_FILE)
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config))
        for name in (WEIGHTS_FILE, TOKENIZER_FILE, CONFIG_FILE):
            storage.write_file(storage.join(uri, name), Path(tmp) / name)


def _wait_for(what: str, check, timeout: float, submit: Submit | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if submit is not None and submit.proc.poll() is not None:
            pytest.fail(f"{what}: the submitted job ended first:\n{submit.logs()}")
        time.sleep(1)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


# ----------------------------------------------------------------------------------------------- the cluster
@pytest.fixture
def two_nodes(local_stack):
    """`longplay stack join --num-cpus 1` on the session stack; yields (head node id, joined node id, node record).

    Run through the CLI exactly as the README's runbook shows; the node is stopped even when the test fails, and
    only its own process group is signalled.
    """
    from pipeline import cluster

    cluster.prepare_client_env()
    client = cluster.job_client()
    state, address = _state(client)
    state_dir = ["--state-dir", str(local_stack.state_dir)]
    cli = [sys.executable, "-m", "infra.cli", "stack"]
    try:
        joined = subprocess.run([*cli, "join", *state_dir, "--num-cpus", "1"], capture_output=True, text=True, cwd=REPO)
        assert joined.returncode == 0, joined.stderr[-2000:]
        (name,) = stack.StackState.load(local_stack.state_dir).nodes
        nodes = _wait_for(
            "the joined node registers",
            lambda: [n for n in state.list_nodes(address=address) if n.state == "ALIVE" and not n.is_head_node],
            120,
        )
        head = next(n for n in state.list_nodes(address=address) if n.is_head_node and n.state == "ALIVE")
        assert len(nodes) == 1 and nodes[0].node_ip == head.node_ip == "127.0.0.1", (nodes, head)
        assert nodes[0].resources_total["CPU"] == 1, nodes
        yield head.node_id, nodes[0].node_id, stack.StackState.load(local_stack.state_dir).nodes[name]
    finally:
        subprocess.run([*cli, "leave", *state_dir], capture_output=True, timeout=120, cwd=REPO)
    assert stack.StackState.load(local_stack.state_dir).nodes == {}


def test_two_node_cluster_runs_preprocess_and_training_and_survives_losing_a_node(local_stack, two_nodes, tmp_path):
    from pipeline import cluster

    head_id, node_id, node = two_nodes
    client = cluster.job_client()
    prefix = local_stack.s3_prefix("two-node")
    _raw_audio(f"{prefix}/raw", tmp_path)
    # every port of both nodes is loopback-only (the joined node's own ports included)
    pids = stack.listening_pids(local_stack.state_dir)
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.pid in pids]
    assert node["ports"]["node-manager-port"] in {c.laddr.port for c in listening}
    assert [c for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")] == []

    # 1. preprocess: two VAE actors, spread over the two nodes (the preset's default scheduling)
    shards = f"{prefix}/shards"
    submit = Submit(
        tmp_path / "preprocess", "preprocess", f"{prefix}/raw", shards, "--vae", "preset:tiny",
        "--config", "configs/tiny/preprocess.yaml", "samples_per_shard=2",
    )  # fmt: skip
    job = submit.finish(timeout=600)
    index = json.loads(storage.read_text(f"{shards}/index.json"))
    assert sum(s["samples"] for s in index["shards"]) == 8 and index["errors"]["count"] == 0
    assert client.get_job_info(job).driver_node_id == head_id  # drivers stay on the head
    assert {a.node_id for a in _actors(client, job, "ShardWorker")} == {head_id, node_id}

    # 2. diffusion: two Ray Train workers spread over the nodes, checkpoints on S3
    clap = f"{prefix}/clap"
    _clap_export(clap)
    name = f"t-two-node-{uuid.uuid4().hex[:6]}"
    checkpoints = f"{prefix}/checkpoints"
    submit = Submit(
        tmp_path / "train", "train", "diffusion", "--config", "configs/tiny/diffusion.yaml", f"data.shards={shards}",
        f"model.clap={clap}", f"run.name={name}", f"run.checkpoint_uri={checkpoints}", f"run.experiment={EXPERIMENT}",
        f"run.max_steps={MAX_STEPS}", "run.checkpoint_every=10", "run.log_every=5", "run.demo_every=1000",
        "data.window_seconds=1.0", "data.shuffle_buffer=8", "deepspeed.warmup_steps=5",
        "scaling.placement_strategy=SPREAD",
    )  # fmt: skip
    try:
        job = _wait_for("the job is submitted", submit.job_id, 120, submit)

        def spread() -> bool:
            alive = [a for a in _actors(client, job, "RayTrainWorker") if a.state == "ALIVE"]
            return sorted(a.node_id for a in alive) == sorted([head_id, node_id])

        _wait_for("one Ray Train worker on each node", spread, 300, submit)
        # 3. once Ray Train has registered a checkpoint (its snapshot names it, after the upload), kill the node
        snapshot = f"{checkpoints}/{name}/checkpoint_manager_snapshot.json"
        _wait_for(
            "a registered checkpoint",
            lambda: storage.exists(snapshot) and "checkpoint_000000" in storage.read_text(snapshot),
            600,
            submit,
        )
        os.killpg(node["pgid"], signal.SIGKILL)  # the whole node: raylet, object store, agents, its workers
        job = submit.finish(timeout=900)
    finally:
        submit.kill()

    # the run finished on the head alone, resumed from a checkpoint, in the same MLflow run
    runs, resumed = _history(name, "resumed_at_step")
    assert runs == 1
    restarts = [v for _, v in resumed if v > 0]
    assert restarts and 10 <= min(restarts) and max(restarts) < MAX_STEPS, resumed  # mid-run, from a checkpoint
    assert max(s for s, _ in _history(name, "loss")[1]) == MAX_STEPS
    workers = [a.node_id for a in _actors(client, job, "RayTrainWorker")]
    assert workers.count(node_id) == 1 and workers.count(head_id) >= 3  # one per node, then two on the head


def test_join_needs_a_running_head(tmp_path):
    with pytest.raises(stack.StackError, match="stack up"):
        raynode.join(tmp_path / "no-stack")
    assert raynode.leave(tmp_path / "no-stack") == []
