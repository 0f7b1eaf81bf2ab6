"""The models of the paper, pure torch: autoencoder, CLAP, conditioning, U-Net and DiT backbones."""

from pipeline.models.autoencoder import Autoencoder, AutoencoderConfig

__all__ = ["Autoencoder", "AutoencoderConfig"]
