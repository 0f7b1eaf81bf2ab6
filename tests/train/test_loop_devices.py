"""The training loops hand the model every input on the engine's device (issue 13).

The engine (DeepSpeed on the CPU, one gloo rank in a subprocess) is made to report ``meta`` as its device, the second
device every machine has; a forward pre-hook on the trained model records the device of every tensor it is handed,
then stops the loop (``Reached``). See tests/pipeline/test_generate_devices.py for why this cannot pass by accident:
the hook must run, and a batch the loop forgot to move is on the CPU, never on ``meta``.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from bundles import write_clap_export  # tests/ is on sys.path (pytest puts the rootless conftest's folder there)

from pipeline import shards

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    port, kind, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(out)
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    from pipeline.config import TrainConfig
    from train import engine as engine_mod, loop
    from train.loop import RankContext
    import importlib

    # The engine (DeepSpeed on the CPU) says its device is 'meta': the loop must put everything it feeds the model
    # there. NaN checks cannot read meta tensors; they are counted instead.
    engine_mod.Engine.device = property(lambda self: torch.device("meta"))
    checked = []
    loop._finite = lambda x: checked.append(str(x.device)) or True
    seen = []

    class Reached(Exception):
        pass

    def hook(module, args, kwargs):
        devices = {f"arg{i}": str(a.device) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        devices |= {k: str(v.device) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        seen.append({"module": type(module).__name__, "inputs": devices})
        raise Reached

    module = importlib.import_module(f"train.{kind}")
    RealEngine = module.Engine

    class Engine(RealEngine):
        def __init__(self, model, *args, **kwargs):
            super().__init__(model, *args, **kwargs)
            model.register_forward_pre_hook(hook, with_kwargs=True)

    module.Engine = Engine
    raw = {
        "kind": kind, "data": {"shards": str(out / "shards"), "window_seconds": 1.0, "shuffle_buffer": 4},
        "run": {"name": "t", "checkpoint_uri": str(out / "ckpt"), "max_steps": 2, "checkpoint_every": 100,
                "demo_every": 100},
        "deepspeed": {"micro_batch": 2, "warmup_steps": 0},
        "model": {"clap": str(out / "clap"), "vae": "preset:tiny"} if kind == "diffusion" else {"vae": None},
    }
    error = None
    try:
        module.train(TrainConfig.model_validate(raw), RankContext(), None)
    except Reached:
        pass
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"seen": seen, "checked": checked, "error": error}))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_audio_shards(out: str, count: int = 4) -> None:
    """Audio shards (the ``--vae none`` layout) of 1 s stereo noise at 44.1 kHz, for the VAE loop."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        buf = io.BytesIO()
        sf.write(buf, rng.normal(0, 0.1, (44100, 2)).astype(np.float32), 44100, format="FLAC")
        meta = {"caption": "noise", "seconds_total": 1.0, "offset_seconds": 0.0, "sample_rate": 44100}
        samples.append(shards.Sample(key=f"noise_{i:03d}", meta=meta, flac=buf.getvalue()))
    stats = [shards.write_shard(out, shards.shard_name("train", 0), samples)]
    shards.write_index(
        out, vae_id="none", vae_config_hash="none", latent_channels=2, latent_rate=44100.0, shards=stats, errors=[]
    )


CAPTIONS = [f"{i} {c} in {k} major" for i in range(20) for c in ("piano", "organ") for k in ("C", "D")]


@pytest.mark.parametrize("kind", ["clap", "diffusion", "vae"])
def test_training_loops_hand_the_model_inputs_on_the_engines_device(kind, tmp_path, dataset_writer):
    """Before (38992b9): the diffusion loop handed the model CPU latents and CPU text tokens (the frozen CLAP stayed
    on the CPU), the CLAP and VAE loops CPU batches, while the engine's device was 'meta'."""
    if kind == "vae":
        _write_audio_shards(str(tmp_path / "shards"))
    else:
        dataset_writer(str(tmp_path / "shards"), "preset:tiny", train_shards=(8,), val=2)
    if kind == "diffusion":
        write_clap_export(tmp_path / "clap", CAPTIONS)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(_free_port()), kind, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result
    assert len(result["seen"]) == 1, result  # the first forward of the trained model stopped the loop
    inputs = result["seen"][0]["inputs"]
    assert len(inputs) >= {"clap": 4, "diffusion": 6, "vae": 1}[kind], inputs
    assert set(inputs.values()) == {"meta"}, f"inputs not on the engine's device: {inputs}"
    assert result["checked"] and set(result["checked"]) == {"meta"}  # the batch the NaN check saw was moved first
