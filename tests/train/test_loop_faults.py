"""The CLAP loop (train/clap.py over the shared helpers of train/loop.py) on one CPU rank (gloo, in a subprocess, local
latent shards) fed NaN latents, an inf loss, or weights that turn NaN (issue 15 item 8): bad micro-batches are
skipped and counted, non-finite weights are never exported or registered."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    port, mode, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", MLFLOW_TRACKING_URI=f"sqlite:///{out}/mlflow.db")
    os.chdir(out)  # MLflow's local artifact store lands here
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    import mlflow
    from pipeline.config import TrainConfig
    from train import clap as clap_loop, data
    from train.loop import RankContext

    cfg = TrainConfig.model_validate({
        "kind": "clap", "data": {"shards": str(out / "shards"), "window_seconds": 1.0, "shuffle_buffer": 8},
        "run": {"name": "t", "checkpoint_uri": str(out / "ckpt"), "experiment": "faults", "max_steps": 6,
                "log_every": 3, "checkpoint_every": 100, "demo_every": 100},
        "deepspeed": {"lr": 1e-2, "warmup_steps": 0, "decay": "constant", "micro_batch": 2},
        "ema": {"decay": 0.5},
    })
    # Faults are injected around the real CLAP loop: its batches, its loss, its engine's weights.
    drawn, engines = [0], []
    real_batches_from, real_info_nce, RealEngine = data.batches_from, clap_loop.info_nce, clap_loop.Engine

    def batches_from(*args, **kwargs):
        make = real_batches_from(*args, **kwargs)

        def batches(start):
            for batch in make(start):
                drawn[0] += 1
                if mode == "latents" and drawn[0] in (2, 5):
                    batch["x"][0, 1] = float("nan")
                yield batch
        return batches

    def info_nce(text, audio, scale):
        out_ = real_info_nce(text, audio, scale)
        if mode == "loss" and drawn[0] in (3, 4):
            out_ = out_._replace(loss=out_.loss * float("inf"))
        if mode == "weights" and drawn[0] == 6:
            with torch.no_grad():  # e.g. an overflow the loss did not show
                next(engines[0].module.parameters()).data.view(-1)[0] = float("nan")
        return out_

    class Engine(RealEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    data.batches_from, clap_loop.info_nce, clap_loop.Engine = batches_from, info_nce, Engine
    error = None
    try:
        clap_loop.train(cfg, RankContext(), None)
    except FloatingPointError as exc:
        error = str(exc)
    client = mlflow.MlflowClient()
    (r,) = client.search_runs([mlflow.get_experiment_by_name("faults").experiment_id])
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
               for k in ("loss", "nonfinite_steps")}
    export_dir = out / "ckpt" / "t" / "export"
    print(json.dumps({
        "error": error, "step": engines[0].global_step, "history": history,
        "exported": sorted(str(p.relative_to(export_dir)) for p in export_dir.rglob("*") if p.is_file())
                    if export_dir.exists() else [],
        "weights_finite": bool(all(torch.isfinite(p).all() for p in engines[0].module.parameters())),
        "registered": [m.name for m in client.search_registered_models()],
    }))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(mode: str, tmp_path, dataset_writer) -> dict:
    dataset_writer(str(tmp_path / "shards"), "preset:tiny", train_shards=(8,), val=2)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(_free_port()), mode, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("mode", "counted"), [("latents", [[3, 1.0], [6, 2.0]]), ("loss", [[3, 2.0], [6, 2.0]])])
def test_nonfinite_batches_are_skipped_and_counted(mode, counted, tmp_path, dataset_writer) -> None:
    """Before: the NaN reached the weights and the EMA, and the NaN export was written and registered."""
    result = _run(mode, tmp_path, dataset_writer)
    assert result["error"] is None and result["step"] == 6
    exported = ["EXPORT.json", "config.json", "model.safetensors", "tokenizer.json", "train_config.json"]
    assert result["weights_finite"] and result["exported"] == exported
    assert all(v == v and abs(v) < float("inf") for _, v in result["history"]["loss"])
    assert result["history"]["nonfinite_steps"] == counted  # draws 2 and 5 (latents), 3 and 4 (loss)
    assert result["registered"] == ["t"]


def test_nonfinite_weights_are_never_exported_or_registered(tmp_path, dataset_writer) -> None:
    result = _run("weights", tmp_path, dataset_writer)
    assert result["error"] is not None and "non-finite weights" in result["error"], result["error"]
    assert result["exported"] == [] and result["registered"] == []
