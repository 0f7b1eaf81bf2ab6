"""The shared benchmark's networks (../shared/bench/ARCH.md) built from our modules, with the configs of
../shared/bench/README.md: the tiny Oobleck VAE (2048x, 16-ch latent, 2,480,882 parameters) and the tiny conditioned
DiT (5,169,280 parameters, 5,235,584 with our timing conditioners). Not a benchmark itself (``make bench`` skips
``_*.py``); benchmarks/generate.py and benchmarks/preprocess.py build their networks here."""

from __future__ import annotations


def vae_config():
    from pipeline.models.autoencoder import AutoencoderConfig

    return AutoencoderConfig(
        latent_channels=16,
        strides=(2, 4, 4, 8, 8),
        encoder_channels=16,
        encoder_multipliers=(1, 2, 4, 8, 16),
        encoder_out_kernel=3,
        decoder_channels=16,
        decoder_multipliers=(1, 2, 4, 8, 16),
        decoder_in_kernel=7,
        decoder_out_bias=False,
        final_tanh=False,
    )


def diffusion_config():
    from pipeline.models.conditioning import DiffusionModelConfig
    from pipeline.models.dit import DiTConfig

    dit = DiTConfig(
        io_channels=16,
        embed_dim=256,
        depth=4,
        num_heads=4,
        cond_token_dim=128,
        cross_attn_dim=128,
        cross_attn_kv_heads=2,
        global_cond_dim=256,
        timestep_features_dim=256,
        rotary_dim=32,
        use_cross_attn_mask=False,
    )
    return DiffusionModelConfig(
        backbone="dit", dit=dit, io_channels=16, cond_token_dim=128, timing="fourier", timing_global=True
    )


def arch_models():
    """(VAE, conditioned DiT) of ARCH.md, random weights, seed 0, in eval mode."""
    import torch

    from pipeline.models.autoencoder import Autoencoder
    from pipeline.models.conditioning import ConditionedDiffusionModel

    torch.manual_seed(0)
    return Autoencoder(vae_config()).eval(), ConditionedDiffusionModel(diffusion_config()).eval()
