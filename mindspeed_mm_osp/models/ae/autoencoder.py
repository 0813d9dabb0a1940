"""Frozen WF-VAE wrapper used by training, feature extraction and inference.

Normalised latents (what the DiT sees) are `(posterior sample - shift) * scale`; decoding
inverts that with `latent / scale + shift` (per-channel vectors from the `ae` JSON). Training
encodes with a posterior *sample*, as the release does, not the mean.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...config.ae import AEConfig
from ...config.dtypes import to_torch_dtype
from .checkpoint import load_wfvae_checkpoint
from .parallel_decode import decode_parallel
from .wfvae import SPATIAL_FACTOR, TEMPORAL_FACTOR, WFVAE, sample_posterior, split_posterior

class VideoAutoencoder(nn.Module):
    """WF-VAE + latent normalisation; eval mode, no gradients, weights in `config.dtype`.

    Weights come from `config.from_pretrained` when set (loaded strictly before the dtype
    cast); otherwise the model keeps its random init (tests only). Move it with `.to(device)`.
    """

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        if config.scale is None or config.shift is None:
            raise ValueError("ae.scale and ae.shift are required: the per-channel latent normalisation "
                             "vectors of the release JSON (latent_dim values each)")
        self.config = config
        self.dtype = to_torch_dtype(config.dtype)
        self.vae = WFVAE(config)
        if config.from_pretrained:
            load_wfvae_checkpoint(self.vae, config.from_pretrained)
        shape = (1, config.latent_dim, 1, 1, 1)
        self.register_buffer("scale", torch.tensor(config.scale).reshape(shape), persistent=False)
        self.register_buffer("shift", torch.tensor(config.shift).reshape(shape), persistent=False)
        self.to(self.dtype)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VideoAutoencoder":
        """Always stays in eval mode (frozen encoder)."""
        return super().train(False)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(Z, (T-1)/8+1, H/8, W/8) for a (T, H, W) video; T = 1 mod 8, H and W multiples of 8."""
        if frames < 1 or (frames - 1) % TEMPORAL_FACTOR or height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
            raise ValueError(f"WF-VAE needs frames = 1 mod {TEMPORAL_FACTOR} and height/width divisible by "
                             f"{SPATIAL_FACTOR}, got {frames}x{height}x{width}")
        return (self.latent_dim, (frames - 1) // TEMPORAL_FACTOR + 1, height // SPATIAL_FACTOR, width // SPATIAL_FACTOR)

    def _chunk(self, size: int) -> int:
        return size if self.config.use_tiling else 0

    @torch.no_grad()
    def encode_posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Video (B, 3, T, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, Z, t, h, w), VAE dtype."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video (B, 3, T, H, W), got shape {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])
        params = self.vae.encode(video.to(self.dtype), self._chunk(self.config.encode_tile_latent_frames))
        return split_posterior(params)

    @torch.no_grad()
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> DiT latent: (z - shift) * scale."""
        return (z - self.shift.to(z.dtype)) * self.scale.to(z.dtype)

    @torch.no_grad()
    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latent -> raw VAE latent: latents / scale + shift."""
        return latents / self.scale.to(latents.dtype) + self.shift.to(latents.dtype)

    @torch.no_grad()
    def sample_latents(self, mean: torch.Tensor, logvar: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Normalised latents from a posterior sample (noise from `generator` or the global RNG)."""
        return self.normalize(sample_posterior(mean, logvar, generator))

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, Z, (T-1)/8+1, H/8, W/8)."""
        return self.sample_latents(*self.encode_posterior(video), generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor,
               group: Optional["torch.distributed.ProcessGroup"] = None) -> Optional[torch.Tensor]:
        """Normalised latents (B, Z, t, h, w) -> video (B, 3, 8t-7, 8h, 8w), nominally [-1, 1], unclamped.

        With `group`, every rank of it decodes a span of the latent frames (`parallel_decode`) and the video is
        returned on the group's rank 0 only (None elsewhere); the result equals the single-rank decode.
        """
        if latents.ndim != 5 or latents.shape[1] != self.latent_dim:
            raise ValueError(f"expected latents (B, {self.latent_dim}, t, h, w), got shape {tuple(latents.shape)}")
        z = self.denormalize(latents.to(self.dtype))
        chunk = self._chunk(self.config.tile_latent_frames)
        if group is None:
            return self.vae.decode(z, chunk)
        return decode_parallel(self.vae, z, chunk, group)
