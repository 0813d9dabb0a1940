"""WF-VAE (Open-Sora Plan v1.5, 8x8x8): model, exact chunked coding, checkpoint loading, frozen wrapper."""

from .autoencoder import VideoAutoencoder
from .checkpoint import CheckpointKeyError, LoadResult, load_wfvae_checkpoint
from .tiny import tiny_ae_config_dict, write_tiny_wfvae
from .wfvae import WFVAE, sample_posterior, split_posterior

__all__ = [
    "CheckpointKeyError", "LoadResult", "VideoAutoencoder", "WFVAE", "load_wfvae_checkpoint",
    "sample_posterior", "split_posterior", "tiny_ae_config_dict", "write_tiny_wfvae",
]
