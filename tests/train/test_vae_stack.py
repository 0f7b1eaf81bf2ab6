"""`train vae` on audio shards from S3: 2 workers, alternating discriminator/generator engines, export registered."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import storage

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_vae_trains_and_exports_a_loadable_autoencoder(
    local_stack, ray_on_stack, audio_dataset, train_config, tmp_path
):
    import mlflow

    from pipeline.components import load_vae
    from train.launch import launch

    checkpoints = local_stack.s3_prefix("vae-checkpoints")
    cfg = train_config(
        "vae",
        audio_dataset,
        checkpoints,
        "t-vae",
        run__max_steps=6,
        run__checkpoint_every=3,
        run__log_every=3,
        data__window_seconds=0.25,
        data__holdout_split=None,
        deepspeed__micro_batch=2,
        deepspeed__lr=3e-4,
        vae__waveform_weight=1.0,  # the optional terms reach the engine too: a waveform term, the posterior mean
        vae__sample_posterior=False,
        vae__unit_latents=True,  # no held-out split here: calibrated on training crops
    )
    result = launch(cfg)
    assert result.error is None, result.error
    (run,) = mlflow.search_runs(
        experiment_names=["longplay-tests"], filter_string="tags.`mlflow.runName` = 't-vae'", output_format="list"
    )
    for key in ("loss", "stft", "waveform", "kl", "adversarial", "feature_matching", "discriminator"):
        assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, key)] == [3, 6], key
    ckpt_files = list(storage.list_uris(storage.join(checkpoints, "t-vae")))
    assert any("/discriminator/" in u for u in ckpt_files)
    export = storage.join(checkpoints, "t-vae", "export")
    vae = load_vae(export)
    assert vae.latent_channels == 64
    # the folded scale: unit RMS on the training crops it was calibrated on, so about 1 on another such tone
    scale = json.loads(storage.read_text(storage.join(export, "config.json")))["_latent_scale_folded"]
    assert 0 < scale < 10
    t = torch.arange(44100) / 44100
    tone = 0.3 * torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 660 * t)])[None]
    with torch.no_grad():
        rms = float(vae.encode(tone).square().mean().sqrt())
    assert 0.3 < rms < 3, (rms, scale)
