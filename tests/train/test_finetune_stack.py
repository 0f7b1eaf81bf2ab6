"""Fine-tuning a released model on the real local stack (S3, MLflow, Ray Train with 2 workers, DeepSpeed on gloo):
``model.init_from`` a bundle, LoRA adapters (peft) or every weight, a CLAP- or T5-conditioned base.

The bases are written here, not trained: a tiny diffusion model with random weights beside a tiny CLAP (the LoRA
base) or a tiny random T5 (the full fine-tune's base), and the tiny VAE the latent shards were encoded with.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import CLASSES, write_base_bundle  # tests/ is on sys.path (the rootless conftest's folder)
from safetensors.torch import save_file
from tiny_t5 import write_tiny_t5  # tests/ is on sys.path (pytest puts the rootless conftest's folder there)

from pipeline import lora, storage
from pipeline.components import load_bundle
from pipeline.models.conditioning import build_diffusion_model
from pipeline.weights import weights_hash

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RANK = 4
ADAPTED = 2 * 2 * 4  # tiny DiT: 2 blocks x (self + cross attention) x (to_q, to_k, to_v, to_out)


def _runs(name: str):
    import mlflow

    return mlflow.search_runs(
        experiment_names=["longplay-tests"], filter_string=f"tags.`mlflow.runName` = '{name}'", output_format="list"
    )


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def _upload(local: Path, uri: str) -> str:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_file(storage.join(uri, *path.relative_to(local).parts), path)
    return uri


@pytest.fixture(scope="module")
def bases(local_stack) -> dict[str, str]:
    """s3:// URIs: a CLAP-conditioned base bundle, a tiny T5 (width 64, the tiny DiT's token width), a T5 base."""
    prefix = local_stack.s3_prefix("finetune")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t5 = _upload(write_tiny_t5(tmp / "t5", d_model=64), storage.join(prefix, "t5"))
        (tmp / "clap-base").mkdir()
        (tmp / "t5-base").mkdir()
        clap_base = _upload(write_base_bundle(tmp / "clap-base", "clap"), storage.join(prefix, "clap-base"))
        t5_base = _upload(write_base_bundle(tmp / "t5-base", "t5", t5), storage.join(prefix, "t5-base"))
    return {"clap_base": clap_base, "t5": t5, "t5_base": t5_base}


@pytest.fixture(scope="module")
def lora_run(local_stack, ray_on_stack, latent_dataset, train_config, bases):
    """20 steps of rank-4 LoRA on the CLAP base under ZeRO-2, then relaunched to 30 (resumes)."""
    from train.launch import launch

    checkpoints = local_stack.s3_prefix("finetune-checkpoints")
    settings = dict(
        run__checkpoint_every=10,
        deepspeed__zero_stage=2,
        deepspeed__lr=1e-2,
        model__init_from=bases["clap_base"],
        model__lora__rank=RANK,
    )
    cfg = train_config("diffusion", latent_dataset, checkpoints, "t-lora", run__max_steps=20, **settings)
    first = launch(cfg)
    assert first.error is None, first.error
    (run,) = _runs("t-lora")
    loss_before_resume = _history(run.info.run_id, "loss")
    cfg = train_config("diffusion", latent_dataset, checkpoints, "t-lora", run__max_steps=30, **settings)
    second = launch(cfg)
    assert second.error is None, second.error
    return cfg, loss_before_resume


def _model_states(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The module weights DeepSpeed saved in a Ray Train checkpoint (rank 0's file, read without unpickling)."""
    from train.engine import load_weights_only

    (uri,) = [u for u in storage.list_uris(checkpoint_dir) if u.endswith("mp_rank_00_model_states.pt")]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "states.pt"
        local.write_bytes(storage.read_bytes(uri))
        return load_weights_only(local, map_location="cpu")["module"]


def test_lora_trains_only_the_adapters_and_resumes(lora_run, bases) -> None:
    cfg, loss_before_resume = lora_run
    run_dir = storage.join(cfg.run.checkpoint_uri, "t-lora")
    base = load_bundle(bases["clap_base"], "cpu").diffusion.state_dict()

    # The live weights at the last checkpoint: every base weight bit for bit as the bundle has it, adapters moved.
    states = _model_states(storage.join(run_dir, "checkpoint_00000030"))
    adapters = {k: v for k, v in states.items() if lora.is_adapter(k)}
    frozen = {k.replace(".base_layer.", "."): v for k, v in states.items() if not lora.is_adapter(k)}
    assert len(adapters) == 2 * ADAPTED
    assert set(frozen) == set(base)
    changed = [k for k in base if not torch.equal(frozen[k].float(), base[k])]
    assert changed == []
    lora_b = [v for k, v in adapters.items() if ".lora_B." in k]  # zero at the start: LoRA begins at the base model
    assert all(v.abs().max() > 0 for v in lora_b)

    # The export: the adapters alone, the base named and hashed; the MLflow run says what was fine-tuned.
    export = storage.join(run_dir, "export")
    config = json.loads(storage.read_text(storage.join(export, "config.json")))
    assert config["base"] == bases["clap_base"]
    assert config["lora"]["rank"] == RANK and config["lora"]["alpha"] == RANK
    assert config["lora"]["base_sha256"] == weights_hash(load_bundle(bases["clap_base"], "cpu").diffusion)
    assert not storage.exists(storage.join(export, "clap", "config.json"))  # the base bundle has the rest

    (run,) = _runs("t-lora")
    assert run.data.tags["lora_rank"] == str(RANK) and run.data.tags["base_model"] == bases["clap_base"]
    assert run.data.params["model.lora.rank"] == str(RANK)
    loss = _history(run.info.run_id, "loss")
    assert [s for s, _ in loss] == [5, 10, 15, 20, 25, 30]
    assert loss[: len(loss_before_resume)] == loss_before_resume  # the relaunch continued the same run
    assert dict(_history(run.info.run_id, "resumed_at_step"))[20] == 20
    assert loss[-1][1] < loss[0][1], loss


def _generate(model: str, wav: Path) -> np.ndarray:
    """``longplay generate`` in its own process (the stack's S3 and MLflow variables are in this one's environment)."""
    import soundfile as sf

    args = ["generate", model, CLASSES[0], *"--seconds 1 --steps 4 --cfg 1 --seed 3 -o".split(), str(wav)]
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    audio, rate = sf.read(wav, dtype="float32")
    assert rate == 44100
    return audio.T


def test_generation_with_the_adapters_differs_from_the_base(lora_run, local_stack, bases, tmp_path) -> None:
    """`longplay generate` on the adapter export (base + adapters) and on the base, same prompt and seed."""
    cfg, _ = lora_run
    export = storage.join(cfg.run.checkpoint_uri, "t-lora", "export")
    with_adapters = _generate(export, tmp_path / "adapted.wav")
    alone = _generate(bases["clap_base"], tmp_path / "base.wav")
    assert with_adapters.shape == alone.shape == (2, 44100)
    assert np.abs(with_adapters - alone).max() > 1e-3  # 24-bit PCM resolves 1.2e-7
    adapted, base = load_bundle(export, "cpu"), load_bundle(bases["clap_base"], "cpu")
    (again,) = adapted.generate([CLASSES[0]], 1.0, steps=4, cfg_scale=1.0, seed=3)  # what the CLI wrote, to 24 bits
    np.testing.assert_allclose(with_adapters, np.clip(again, -1, 1 - 2.0**-23), rtol=0, atol=2.0**-22)

    # The merged export option: the same model as base + adapters, with the base's parameter names.
    x, t = torch.randn(2, 64, 43, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    tokens, mask = adapted.text.encode(CLASSES[:2])
    timing = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        v_adapted = adapted.diffusion(x, t, tokens, mask, *timing)
        merged = lora.merge_adapters(adapted.diffusion)
        assert set(merged.state_dict()) == set(base.diffusion.state_dict())
        torch.testing.assert_close(merged(x, t, tokens, mask, *timing), v_adapted, rtol=1e-5, atol=1e-5)


def test_lora_export_refuses_a_base_that_changed(lora_run, local_stack, bases, tmp_path) -> None:
    """An adapter export names its base by URI; if that URI now holds other weights, loading says so."""
    cfg, _ = lora_run
    export = storage.join(cfg.run.checkpoint_uri, "t-lora", "export")
    config = json.loads(storage.read_text(storage.join(export, "config.json")))
    other = storage.join(local_stack.s3_prefix("finetune"), "other-base")
    (tmp_path / "other").mkdir()
    write_base_bundle(tmp_path / "other", "clap")
    save_file(
        {k: v + 0.01 for k, v in build_diffusion_model("tiny").state_dict().items()},
        str(tmp_path / "other" / "model.safetensors"),
    )
    _upload(tmp_path / "other", other)
    moved = storage.join(local_stack.s3_prefix("finetune"), "moved-adapters")
    storage.write_text(storage.join(moved, "config.json"), json.dumps({**config, "base": other}))
    storage.write_bytes(
        storage.join(moved, "model.safetensors"), storage.read_bytes(storage.join(export, "model.safetensors"))
    )
    with pytest.raises(ValueError, match="not the model the adapters were trained on"):
        load_bundle(moved, "cpu")


def test_full_fine_tune_of_a_t5_bundle_starts_at_its_weights(
    local_stack, ray_on_stack, latent_dataset, train_config, bases
) -> None:
    """Every weight trains, from the base's; the text conditioner is the base's T5; the export is a T5 bundle."""
    from train.launch import launch

    checkpoints = local_stack.s3_prefix("finetune-checkpoints")
    cfg = train_config(
        "diffusion",
        latent_dataset,
        checkpoints,
        "t-full",
        run__max_steps=10,
        run__checkpoint_every=10,
        model__init_from=bases["t5_base"],
    )
    result = launch(cfg)
    assert result.error is None, result.error
    (run,) = _runs("t-full")
    assert run.data.tags["text_encoder"] == "t5" and run.data.tags["text_encoder_uri"] == bases["t5"]
    export = storage.join(checkpoints, "t-full", "export")
    config = json.loads(storage.read_text(storage.join(export, "config.json")))
    assert (config["text_encoder"], config["t5"], config["base"]) == ("t5", bases["t5"], bases["t5_base"])
    tuned, base = load_bundle(export, "cpu"), load_bundle(bases["t5_base"], "cpu")
    moved = [k for k, v in base.diffusion.state_dict().items() if not torch.equal(v, tuned.diffusion.state_dict()[k])]
    assert len(moved) > 10  # every weight trains (the timing conditioners and the backbone)
    (audio,) = tuned.generate([CLASSES[1]], 1.0, steps=2, cfg_scale=1.0, seed=0)
    assert audio.shape == (2, 44100) and np.isfinite(audio).all()
