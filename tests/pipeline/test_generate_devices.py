"""Every stage hands its models tensors on the models' own device (issue 13).

CI has no GPU, so the tests use a second device that every machine has: ``meta`` (tensors with shapes and no data).
A stage is told to run on ``meta``; a forward pre-hook on the model that stage feeds records the device of every
tensor it is handed (positional and keyword arguments) and of the model's parameters, then raises ``Reached`` so
nothing has to compute on data that is not there. The test then asserts that the hook ran and saw only ``meta``.

It cannot pass by accident: the hook must have run (a stage that fails earlier, or never calls the model, raises
something else), the inputs it saw are listed, and ``meta`` is never where a forgotten ``.to(device)`` leaves a
tensor (that is the CPU, where numpy, the data loader and ``torch.from_numpy`` put them). On the code before this
change the training loops handed the model CPU batches and CPU text tokens while its engine said ``meta``, and
``pipeline.load`` had no device at all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline import components, evaluate
from pipeline.config import EvaluateConfig


class Reached(Exception):
    """Raised by the hook once it has seen the model's inputs."""


def record_inputs(model: torch.nn.Module, seen: list[dict[str, object]]):
    """A forward pre-hook on ``model`` that appends {parameter device, input name → device} to ``seen`` and stops."""

    def hook(module, args, kwargs):
        devices = {f"arg{i}": str(a.device) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        devices |= {k: str(v.device) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        seen.append({"parameters": str(next(module.parameters()).device), "inputs": devices})
        raise Reached

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def assert_all_on(seen: list[dict[str, object]], device: str, at_least: int) -> None:
    assert seen, "the model was never called"
    (call,) = seen
    assert call["parameters"] == device
    assert len(call["inputs"]) >= at_least, call  # x, t, text tokens, mask, timing: every tensor argument counted
    assert set(call["inputs"].values()) == {device}, f"inputs not on the model's device {device}: {call['inputs']}"


def test_pipeline_load_on_the_cpu_generates(bundle_dir):
    """``pipeline.load(uri, device="cpu")`` (run in a fresh interpreter: under pytest, ``pipeline`` can resolve to
    the tests/pipeline folder)."""
    code = (
        "import json, sys, pipeline; b = pipeline.load(sys.argv[1], device='cpu'); "
        "(a,) = b.generate(['0 piano in C major'], seconds=1.0, steps=2, seed=3); "
        "print(json.dumps([str(b.device), str(b.clap.logit_scale.device), list(a.shape)]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bundle_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == ["cpu", "cpu", [2, 44100]]


def test_a_loaded_bundle_is_on_the_device_and_generation_feeds_it_there(bundle_dir):
    bundle = components.load_bundle(str(bundle_dir), device="meta")  # what pipeline.load(uri, device) returns
    assert {str(p.device) for m in (bundle.diffusion, bundle.clap, bundle.autoencoder) for p in m.parameters()} == {
        "meta"
    }
    seen: list[dict[str, object]] = []
    record_inputs(bundle.diffusion, seen)
    with pytest.raises(Reached):
        bundle.generate(["0 piano in C major"], seconds=1.0, steps=2, seed=3)
    assert_all_on(seen, "meta", at_least=6)  # x, t, tokens, token mask, seconds_start, seconds_total


def test_evaluation_keeps_the_bundle_on_its_device(bundle_dir, tmp_path, monkeypatch):
    """Before: the evaluation embedder (ProjectClap, device "cpu" by default) moved the bundle's VAE and CLAP back to
    the CPU, so generation then handed the model CPU text tokens."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pipeline import embedders

    # Meta tensors hold no data: the weights hash and the zero-shot label embeddings are not computed. ProjectClap,
    # which moves the VAE and CLAP it is given to its own device, is still built as evaluation builds it.
    monkeypatch.setattr(evaluate, "clap_embedder_name", lambda bundle: "longplay-clap-test")
    monkeypatch.setattr(embedders, "select_embedders", lambda paths, project_clap: project_clap)
    seen: list[dict[str, object]] = []

    def load_bundle(uri, device=None):
        bundle = components_load(uri, device)
        record_inputs(bundle.diffusion, seen)
        return bundle

    components_load = components.load_bundle
    monkeypatch.setattr(components, "load_bundle", load_bundle)  # evaluate_model imports it from there when it runs
    prompts = tmp_path / "p.txt"
    prompts.write_text("0 piano in C major\n")
    with pytest.raises(Reached):
        evaluate.evaluate_model(str(bundle_dir), str(prompts), None, tmp_path / "out", EvaluateConfig(steps=2), "meta")
    assert_all_on(seen, "meta", at_least=6)


def test_generate_and_evaluate_run_with_device_cpu(bundle_dir, tmp_path, monkeypatch):
    """``longplay generate --device cpu`` and ``longplay evaluate --device cpu`` (in process, on the tiny bundle)."""
    import soundfile as sf

    from infra import cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    asked, devices = [], []
    real_load = components.load_bundle

    def load_bundle(uri, device=None):
        bundle = real_load(uri, device)
        asked.append(device)  # the flag reaches the loader (not its default, which is also the CPU here)
        devices.append(str(bundle.device))
        return bundle

    monkeypatch.setattr(components, "load_bundle", load_bundle)
    wav = tmp_path / "one.wav"
    argv = ["generate", str(bundle_dir), "solo piano", "--seconds", "1", "--steps", "2", "-o", str(wav)]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    assert sf.info(wav).frames == 44100 and sf.info(wav).channels == 2
    prompts = tmp_path / "p.txt"
    prompts.write_text("0 piano in C major\n")
    argv = ["evaluate", str(bundle_dir), "--prompts", str(prompts), "--out", str(tmp_path / "eval"), "steps=2"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [row["samples"] for row in report["files"]] == [round(10.0 * 44100)]  # the config's default 10 s
    assert asked == ["cpu", "cpu"] and devices == ["cpu", "cpu"]


@pytest.mark.parametrize("command", ["generate", "evaluate"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_device_cuda_without_cuda_exits_2_in_one_line(command, device, bundle_dir, tmp_path, capsys):
    from infra import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = {
        "generate": ["generate", str(bundle_dir), "x", "--seconds", "1", "-o", str(tmp_path / "x.wav")],
        "evaluate": ["evaluate", str(bundle_dir), "--prompts", str(tmp_path / "p.txt")],
    }[command]
    assert cli.main([*argv, "--device", device]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"argument --device: {device} asked for, but CUDA is not available on this machine" in line, line
    assert not (tmp_path / "x.wav").exists()


def test_the_default_device_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert components.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert components.resolve_device(None) == torch.device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        components.resolve_device("gpu0")
