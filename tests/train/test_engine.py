"""The DeepSpeed engine on one CPU rank (gloo, in a subprocess so this process keeps no process group): schedule,
config, ZeRO 0-3 (fp32 and bf16) with gradient accumulation, EMA, a save/load round trip that continues the run
exactly, and checkpoints that load without pickle (weights-only, our allow-list and nothing more)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from pipeline.config import DeepSpeedSection, TrainConfig
from train.engine import deepspeed_config, lr_factor


def test_lr_schedule() -> None:
    assert [lr_factor(s, 4, "constant", 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, "cosine", 104) == 1.0
    assert lr_factor(54, 4, "cosine", 104) == pytest.approx(0.5)
    assert lr_factor(104, 4, "cosine", 104) == pytest.approx(0.0)
    assert lr_factor(15, 4, "inverse", 100) == pytest.approx(math.sqrt(4 / 16))


def test_deepspeed_config() -> None:
    ds = DeepSpeedSection(zero_stage=2, precision="bf16", micro_batch=4, grad_accum=3, grad_clip=0.5)
    cfg = deepspeed_config(ds, world_size=2)
    assert cfg["train_batch_size"] == 24 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"] == {"enabled": True}
    assert cfg["gradient_clipping"] == 0.5
    # fp16 without a GPU is refused by the schema, before any engine is built (tests/pipeline/test_config.py too)
    with pytest.raises(ValueError, match="fp16"):
        TrainConfig.model_validate({"kind": "clap", "data": {"shards": "x"}, "deepspeed": {"precision": "fp16"}})
    assert deepspeed_config(DeepSpeedSection(precision="fp16"), 1)["fp16"]["enabled"] is True  # on GPUs


SCRIPT = textwrap.dedent(
    """
    import json, os, pickle, sys, tempfile
    from pathlib import Path
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    from pipeline.config import TrainConfig
    from train.engine import DEEPSPEED_SAFE_GLOBALS, Engine, load_weights_only

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.scale = torch.nn.Parameter(torch.tensor(1.5))  # 0-dim, as CLAP's logit scale
        def forward(self, x):
            return self.lin(x) * self.scale

    class Tampered:  # unpickling it creates a file: the proof that a loader ran code from a checkpoint
        def __init__(self, path):
            self.path = path
        def __reduce__(self):
            return (Path.touch, (Path(self.path),))

    def make(stage, precision, seed):
        torch.manual_seed(seed)
        cfg = TrainConfig.model_validate({"kind": "clap", "data": {"shards": "x"}, "run": {"max_steps": 20},
            "deepspeed": {"zero_stage": stage, "precision": precision, "micro_batch": 2, "grad_accum": 2,
                          "warmup_steps": 3, "lr": 1e-2},
            "ema": {"decay": 0.5}})
        return Engine(Net(), cfg, 0, 1)

    def steps(engine, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n * 2):  # grad_accum = 2 micro-steps per optimizer step
            loss = engine(torch.randn(2, 4, generator=g).to(engine.dtype)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()

    def pickle_free(d):  # every .pt file loads weights-only with our allow-list alone; no other formats
        files = sorted(f for f in d.rglob("*") if f.is_file())
        unsafe = set()
        for f in files:
            if f.suffix == ".pt":
                unsafe |= set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
                load_weights_only(f, map_location="cpu")
        return {"suffixes": sorted({f.suffix for f in files}), "pt_files": sum(f.suffix == ".pt" for f in files),
                "unsafe_outside_list": sorted(unsafe - set(DEEPSPEED_SAFE_GLOBALS))}

    def refuses_tampered(d):  # a model-state file with a pickled callable: Engine.load refuses it, nothing runs
        target = next(d.rglob("*model_states.pt"))
        marker = d / "code_ran"
        torch.save({**load_weights_only(target), "extra": Tampered(str(marker))}, target)
        try:
            make(0, "fp32", 5).load(d)
            refused = False
        except pickle.UnpicklingError as err:
            refused = "refused" in str(err)
        return refused and not marker.exists()

    out = {}
    for stage, precision in [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (2, "bf16"), (3, "bf16")]:
        a = make(stage, precision, 0)
        steps(a, 3, seed=1)
        d = Path(tempfile.mkdtemp())
        a.save(d, {"mlflow_run_id": "abc"})
        checked = pickle_free(d)
        b = make(stage, precision, 99)
        state = b.load(d)
        steps(a, 2, seed=2)
        steps(b, 2, seed=2)
        wa, wb = a.export_state_dict(), b.export_state_dict()
        live = a.full_state_dict()
        out[f"{stage}-{precision}"] = {
            "step": [a.global_step, b.global_step], "state": state, "lr": [a.lr(), b.lr()], "files": checked,
            "same": all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa),
            "scale_shape": list(wa["scale"].shape),
            "ema_differs": not torch.equal(wa["lin.weight"], live["lin.weight"]),
            "grad_norm": a.grad_norm(),
        }
        dist.barrier()
        if stage == 0 and precision == "fp32":
            out["tampered_refused"] = refuses_tampered(d)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_engine_zero_stages_save_load_continue_exactly(tmp_path) -> None:
    script = tmp_path / "engine_check.py"
    script.write_text(SCRIPT)
    port = str(29500 + (abs(hash(str(tmp_path))) % 2000))
    proc = subprocess.run([sys.executable, str(script), port], capture_output=True, text=True, timeout=600, cwd=".")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    result = json.loads(line[0][len("RESULT") :])
    assert result.pop("tampered_refused"), "a checkpoint holding a pickled callable was loaded (or the callable ran)"
    assert set(result) == {"0-fp32", "1-fp32", "2-fp32", "3-fp32", "0-bf16", "2-bf16", "3-bf16"}
    for stage, r in result.items():
        assert r["files"]["pt_files"] > 0 and r["files"]["unsafe_outside_list"] == [], (stage, r["files"])
        assert set(r["files"]["suffixes"]) <= {".pt", ".safetensors", ".json"}, (stage, r["files"])
        assert r["step"] == [5, 5], (stage, r)
        assert r["state"]["global_step"] == 3 and r["state"]["mlflow_run_id"] == "abc"
        assert r["lr"][0] == r["lr"][1]
        assert r["same"], f"ZeRO-{stage}: the resumed engine diverged from the original"
        assert r["scale_shape"] == [] and r["ema_differs"]
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
