"""The WF-VAE training objective (formulas: docs/vae_training.md).

Normalisation follows the WF-VAE release, so its published weights (KL 1e-6, wavelet 0.1, ...) mean the same
here: the reconstruction and perceptual terms are summed over each frame's pixels and averaged over frames, the
KL and wavelet terms summed over each sample and averaged over samples. Every term is a mean over the samples of
a micro-batch, so data parallelism over samples gives the same gradient as one larger micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ...config.vae_training import VAELossConfig
from .wfvae import TrainOutput


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each sample's latent, averaged over samples."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def reconstruction_loss(video: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
    """|x - x̂| (l1) or (x - x̂)^2 (l2) summed over each frame's pixels, averaged over the B*T frames."""
    diff = (recon - video).abs() if kind == "l1" else (recon - video).pow(2)
    return diff.sum() / (video.shape[0] * video.shape[2])


def wavelet_loss(coeffs: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> torch.Tensor:
    """Energy-flow loss: sum |input's Haar coefficients - the decoder branch's| per level, per sample."""
    batch = coeffs[0][0].shape[0]
    return sum((dec - enc).abs().sum() for enc, dec in coeffs) / batch


def frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), for the per-frame perceptual loss."""
    return video.transpose(1, 2).flatten(0, 1)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d nll / d w_last|| / (||d g / d w_last|| + 1e-6), clamped to [0, 1e6]: balances the adversarial term
    against the reconstruction at the decoder's last layer (no gradient flows through the weight)."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-6)).clamp(0.0, 1e6).detach()


@dataclass
class GeneratorLoss:
    """The autoencoder's loss and its parts (detached, for the log)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def generator_loss(cfg: VAELossConfig, video: torch.Tensor, out: TrainOutput, *, perceptual=None,
                   discriminator=None, last_layer: Optional[torch.Tensor] = None) -> GeneratorLoss:
    """Weighted sum of reconstruction (+ perceptual), KL, wavelet and (when `discriminator`) adversarial terms."""
    rec = reconstruction_loss(video, out.reconstruction, cfg.reconstruction)
    nll = cfg.reconstruction_weight * rec
    parts = {"rec": rec.detach()}
    if perceptual is not None:
        p = perceptual(frames(video), frames(out.reconstruction)).sum() / (video.shape[0] * video.shape[2])
        nll = nll + cfg.perceptual_weight * p
        parts["perceptual"] = p.detach()
    kl, wl = kl_divergence(out.mean, out.logvar), wavelet_loss(out.coeffs)
    total = nll + cfg.kl_weight * kl + cfg.wavelet_weight * wl
    parts.update(kl=kl.detach(), wavelet=wl.detach())
    if discriminator is not None:
        adv = -discriminator(out.reconstruction).mean()
        weight = adaptive_weight(nll, adv, last_layer) if cfg.discriminator_adaptive else torch.ones(())
        total = total + cfg.discriminator_weight * weight * adv
        parts.update(adversarial=adv.detach(), d_weight=weight)
    return GeneratorLoss(total, parts)


__all__ = ["GeneratorLoss", "adaptive_weight", "frames", "generator_loss", "hinge_discriminator_loss",
           "kl_divergence", "reconstruction_loss", "wavelet_loss"]
