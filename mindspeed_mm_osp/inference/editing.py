"""Video editing with a strength (`--video PATH --strength S`), SDEdit-style (Meng et al. 2022, "SDEdit: Guided
Image Synthesis and Editing with Stochastic Differential Equations"): the clip's latents are put on the
flow-matching path at the sigma where sampling starts, and only the remaining steps are denoised under the prompt.

With N sampling steps and strength s in [0, 1], the first k = floor(N * (1 - s) + 1/2) steps (N * (1 - s) rounded
half up) are skipped and sampling starts at sigma_k of the schedule from x_k = (1 - sigma_k) * z + sigma_k * noise:
z the clip's normalised latents (VAE posterior mean, deterministic, so every rank computes the same), noise the
tensor text-to-video draws for the same prompt and seed. k = 0 (s = 1) starts from the noise itself, as
text-to-video does; k = N (s = 0) runs no step and returns z, whose decode is the clip's VAE round trip. The strength
is a share of the steps, not a sigma: a shifted schedule starts higher (shift 7, N = 4, s = 0.5: sigma_2 = 0.875).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .conditioning import clip_frames, read_clip


@dataclass(frozen=True)
class EditRequest:
    """What the command line asks to edit: the clip and the strength."""

    video: str
    strength: float


def start_step(num_steps: int, strength: float) -> int:
    """The schedule step sampling starts at: N * (1 - strength) rounded half up (0 = every step runs)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return min(num_steps, math.floor(num_steps * (1.0 - strength) + 0.5))


def edit_pixels(path: str, frames: int, height: int, width: int) -> torch.Tensor:
    """The clip's first `frames` frames at the output size, (3, T, H, W) in [-1, 1] (the continuation reader and
    transform)."""
    return clip_frames(read_clip(path, frames), height, width).permute(1, 0, 2, 3).contiguous()


@dataclass(frozen=True)
class EditSource:
    """The clip of one run: pixels (3, T, H, W), latents (1, C, t, h, w) fp32 on CPU, the start step and the
    schedule from it on (`sigmas[start:]`, what the sampler integrates)."""

    pixels: torch.Tensor
    latents: torch.Tensor
    start: int
    sigmas: torch.Tensor

    @classmethod
    @torch.no_grad()
    def encode(cls, vae, pixels: torch.Tensor, sigmas: torch.Tensor, strength: float) -> "EditSource":
        device = next(vae.parameters()).device
        latents = vae.normalize(vae.encode_posterior(pixels[None].to(device))[0]).float().cpu()
        start = start_step(sigmas.numel() - 1, strength)
        return cls(pixels, latents, start, sigmas[start:])

    @property
    def steps(self) -> int:
        """Denoising steps left to run."""
        return self.sigmas.numel() - 1

    def start_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The sampler's initial latents for a batch whose text-to-video noise is `noise` (B, C, t, h, w)."""
        if self.start == 0:
            return noise
        if self.steps == 0:
            return self.latents.expand_as(noise).clone()
        sigma = self.sigmas[0]
        return (1 - sigma) * self.latents + sigma * noise

    def record(self, request: EditRequest) -> dict:
        """The edit's settings for the sample's sidecar."""
        return {"video": request.video, "strength": request.strength, "start_step": self.start,
                "steps_run": self.steps, "start_sigma": float(self.sigmas[0])}


__all__ = ["EditRequest", "EditSource", "edit_pixels", "start_step"]
