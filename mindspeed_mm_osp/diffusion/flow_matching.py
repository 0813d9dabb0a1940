"""Open-Sora Plan v1.5 rectified flow: sigma sampling, shifting, noising, target, loss.

Convention (docs/model.md, "Flow matching and sampling"): x_sigma = sigma * eps + (1 - sigma) * x0 with
sigma in [0, 1] (1 = pure noise), the model predicts the velocity v = eps - x0, and the
timestep it sees is 1000 * sigma as a float. The scheduler is pure: it draws only from
the generator it is given, so the training loop decides how TP/CP peers agree on noise
and sigmas (same seed, or a broadcast).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..config.diffusion import DiffusionConfig


def dynamic_shift_mu(image_seq_len: int, config: DiffusionConfig) -> float:
    """mu of the resolution-dependent shift: linear in the token count, from
    (base_image_seq, base_shift) to (max_image_seq, max_shift); not clamped outside."""
    k = (config.max_shift - config.base_shift) / (config.max_image_seq - config.base_image_seq)
    return k * image_seq_len + config.base_shift - k * config.base_image_seq


def image_seq_len(latent_hw: tuple[int, int]) -> int:
    """Spatial tokens after the 2x2 patchify. Latent frames are ignored, as in the reference
    (its dynamic shift is per frame, unlike Flux's formula)."""
    height, width = latent_hw
    return (width * height) // 4


def shift_sigmas(sigmas: torch.Tensor | np.ndarray, shift: float, sigma_eps: float = 0.0):
    """s*sigma / (1 + (s-1)*sigma), floored at `sigma_eps`.

    Equal to the reference's dynamic form exp(mu) / (exp(mu) + 1/sigma - 1) with s = exp(mu),
    but finite at sigma = 0.
    """
    shifted = shift * sigmas / (1 + (shift - 1) * sigmas)
    if isinstance(shifted, torch.Tensor):
        return shifted.clamp_min(sigma_eps)
    return np.maximum(shifted, sigma_eps)


def linear_quadratic_schedule(num_steps: int, approximate_steps: Optional[int] = None) -> np.ndarray:
    """Sigmas (num_steps + 1, float64, from 1 to 0): the first half of the steps moves
    linearly over a small noise range, the second half finishes quadratically.

    With n = num_steps/2 and a = approximate_steps/2 the "noise-removed" value is i/(2a)
    for i < n and qa*i^2 + qb*i + qc for n <= i < 2n (continuous at n, 1 at 2n), then 1;
    sigma = 1 - value. approximate_steps defaults to min(max(10*num_steps, 250), 1000).
    """
    if approximate_steps is None:
        approximate_steps = min(max(10 * num_steps, 250), 1000)
    if num_steps % 2 or approximate_steps % 2:
        raise ValueError(f"num_steps ({num_steps}) and approximate_steps ({approximate_steps}) must be even")
    n, a = num_steps // 2, approximate_steps // 2
    qa = (a - n) / (a * n * n)
    qb = (5 * n - 4 * a) / (2 * a * n)
    qc = (a - n) / a
    removed = [i / (2 * a) for i in range(n)] + [qa * i * i + qb * i + qc for i in range(n, 2 * n)] + [1.0]
    return 1.0 - np.asarray(removed, dtype=np.float64)


class FlowMatchingScheduler:
    """Training-side and sampling-schedule maths for one `DiffusionConfig`."""

    def __init__(self, config: DiffusionConfig):
        self.config = config

    # ---------------------------------------------------------------- shifting
    def shift_for(self, latent_hw: Optional[tuple[int, int]]) -> float:
        """The shift s: exp(mu(H_lat*W_lat/4)) when dynamic, else the static `shift`."""
        if not self.config.use_dynamic_shifting:
            return self.config.shift
        if latent_hw is None:
            raise ValueError("use_dynamic_shifting needs the latent (height, width)")
        return math.exp(dynamic_shift_mu(image_seq_len(latent_hw), self.config))

    # ---------------------------------------------------------------- training
    def sample_sigmas(self, batch: int, latent_hw: Optional[tuple[int, int]] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-sample training sigmas (B,), fp32 on CPU, already shifted and floored at sigma_eps.

        logit_normal: sigmoid(N(logit_mean, logit_std)); mode: the SD3 mode density with
        `mode_scale`; any other scheme (uniform, sigma_sqrt, cosmap, none): U(0, 1).
        """
        cfg = self.config
        if cfg.weighting_scheme == "logit_normal":
            u = torch.normal(cfg.logit_mean, cfg.logit_std, size=(batch,), generator=generator)
            sigmas = torch.sigmoid(u)
        elif cfg.weighting_scheme == "mode":
            u = torch.rand(batch, generator=generator)
            sigmas = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            sigmas = torch.rand(batch, generator=generator)
        return shift_sigmas(sigmas, self.shift_for(latent_hw), cfg.sigma_eps)

    @staticmethod
    def timesteps(sigmas: torch.Tensor) -> torch.Tensor:
        """What the DiT is conditioned on: 1000 * sigma, float (not rounded)."""
        return sigmas * 1000.0

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """x_sigma = sigma*eps + (1-sigma)*x0 in fp32, returned in x0's dtype; sigmas (B,)."""
        s = sigmas.to(device=x0.device, dtype=torch.float32).reshape(-1, *([1] * (x0.ndim - 1)))
        return (s * noise.float() + (1.0 - s) * x0.float()).to(x0.dtype)

    @staticmethod
    def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Velocity from data towards noise: eps - x0."""
        return noise - x0

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (B,): sigma_sqrt -> sigma^-2, cosmap -> 2/(pi(1-2s+2s^2)), else 1."""
        scheme = self.config.weighting_scheme
        sigmas = sigmas.float()
        if scheme == "sigma_sqrt":
            return sigmas ** -2.0
        if scheme == "cosmap":
            return 2.0 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
        return torch.ones_like(sigmas)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
             sigmas: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Weighted MSE in fp32 (scalar).

        `mask` (B, T, H, W), 1 = valid latent, is broadcast over channels and normalises
        globally: sum(mask*err) / sum(mask*1 over C) — over the whole batch, not per sample,
        as the reference. No mask or an all-ones mask gives the plain mean. `sigmas` (the
        shifted ones used for noising) are needed only for sigma_sqrt/cosmap weighting.
        """
        err = (pred.float() - target.float()) ** 2
        if self.config.weighting_scheme in ("sigma_sqrt", "cosmap"):
            if sigmas is None:
                raise ValueError(f"weighting_scheme {self.config.weighting_scheme!r} needs the sigmas")
            err = err * self.loss_weights(sigmas).to(err.device).reshape(-1, *([1] * (err.ndim - 1)))
        if mask is None or bool(mask.bool().all()):
            return err.mean()
        mask = mask.to(device=err.device, dtype=torch.float32).unsqueeze(1).expand_as(err)
        return (err * mask).sum() / mask.sum()

    # ---------------------------------------------------------------- sampling
    def sampling_sigmas(self, num_steps: Optional[int] = None,
                        latent_hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The S+1 sigmas (fp32, 1 -> 0) of the Euler sampler.

        Default: linspace(1, 0, S+1), shifted when shift > 1 or dynamic shifting is on
        (`latent_hw` of the requested video is then required). With
        `use_linear_quadratic_schedule` the schedule is used unshifted, as in the released
        (NPU) scheduler; the GPU text-to-image branch shifts it, which we do not.
        Computed in float64, returned as float32.
        """
        cfg = self.config
        num_steps = num_steps or cfg.num_inference_steps
        if cfg.use_linear_quadratic_schedule:
            sigmas = linear_quadratic_schedule(num_steps)
        else:
            sigmas = np.linspace(1.0, 0.0, num_steps + 1)
            if cfg.shift > 1.0 or cfg.use_dynamic_shifting:
                sigmas = shift_sigmas(sigmas, self.shift_for(latent_hw), cfg.sigma_eps)
        return torch.from_numpy(np.ascontiguousarray(sigmas)).to(torch.float32)
