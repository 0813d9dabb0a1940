"""Image-to-video / continuation conditioning of SparseUMMDiT: the Open-Sora Plan 1.3 inpainting layout.

The inpaint variant (`predictor.model_id = "SparseUMMDiTInpaint"`) sees, along channels,

    [noisy latent (C) | latent of the masked video (C) | latent mask (s)]     with s = vae_scale_factor_t,

so `patch_embed` takes 2*C + s channels (C = 32, s = 8: 72 for v1.5). The masked video is the clip with every
generated pixel frame set to -1 (black after the [-1, 1] normalisation), encoded by the same VAE. The pixel-frame
mask (1 = generate, 0 = given) is folded to the latent grid with the causal first frame handled as the VAE does:
latent frame 0 holds pixel frame 0 alone, so it is repeated s times; latent frame i >= 1 holds pixel frames
(i-1)*s+1 .. i*s, one per channel. Only the temporal rule matters here: every mask type is per frame, so the mask
is constant over height and width (the reference's bilinear spatial resize of such a mask is the same constant).

T2V weights load with the new input channels of `patch_embed` set to zero: at initialisation the inpaint model
ignores its condition and equals the T2V model exactly (the reference reaches the same with zero-initialised
projections of two extra patch embeddings; one wider convolution spans the same functions with fewer weights).
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from ...config.predictor import PredictorConfig

logger = logging.getLogger(__name__)

PATCH_EMBED_WEIGHT = "patch_embed.proj.weight"
MASKED_PIXEL_VALUE = -1.0


def compress_mask(frame_mask: torch.Tensor, stride_t: int, height: int, width: int) -> torch.Tensor:
    """Pixel-frame mask (B, T), 1 = generate, T = 1 mod stride_t -> latent mask (B, stride_t, t, height, width).

    Channel j of latent frame 0 is pixel frame 0 (for every j); of latent frame i >= 1 it is pixel frame
    (i-1)*stride_t + 1 + j.
    """
    b, frames = frame_mask.shape
    if (frames - 1) % stride_t:
        raise ValueError(f"frame mask of {frames} frames: needs 1 mod {stride_t} frames (the VAE's temporal factor)")
    mask = torch.cat([frame_mask[:, :1].expand(b, stride_t), frame_mask[:, 1:]], dim=1)
    mask = mask.reshape(b, -1, stride_t).transpose(1, 2)  # (B, s, t)
    return mask[..., None, None].expand(*mask.shape, height, width).contiguous()


def generated_latent_frames(latent_mask: torch.Tensor) -> torch.Tensor:
    """(B, s, t, h, w) latent mask -> (B, t, h, w) float, 1 where any pixel frame of the latent frame is generated."""
    return (latent_mask.amax(dim=1) > 0.5).float()


def given_latent_frames(latent_mask: torch.Tensor) -> torch.Tensor:
    """(B, s, t, h, w) -> (B, 1, t, h, w) bool, True where every pixel frame of the latent frame is given: the latent
    frames that equal the condition's latent exactly (the causal VAE encodes them from given frames only)."""
    return (latent_mask.amax(dim=1, keepdim=True) < 0.5)


def masked_video(video: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Video (B, 3, T, H, W) in [-1, 1] with the generated frames (frame_mask (B, T) = 1) set to -1."""
    keep = frame_mask[:, None, :, None, None].to(video.device) < 0.5
    return torch.where(keep, video, torch.full_like(video, MASKED_PIXEL_VALUE))


def inpaint_input(noisy: torch.Tensor, masked_latents: torch.Tensor, latent_mask: torch.Tensor) -> torch.Tensor:
    """The inpaint variant's input: [noisy | masked_latents | latent_mask] along channels, in `noisy`'s dtype."""
    if noisy.shape != masked_latents.shape or latent_mask.shape[2:] != noisy.shape[2:]:
        raise ValueError(f"noisy {tuple(noisy.shape)}, masked latents {tuple(masked_latents.shape)} and latent mask "
                         f"{tuple(latent_mask.shape)} must share (B, ..., t, h, w) (and C for the first two)")
    return torch.cat([noisy, masked_latents.to(noisy), latent_mask.to(noisy)], dim=1)


def widen_patch_embed(state_dict: Mapping[str, torch.Tensor], config: PredictorConfig) -> dict:
    """T2V weights for the inpaint variant: `patch_embed` weight (D, C, p, p) -> (D, 2C + s, p, p), the T2V weight
    in the first C input channels and zeros in the new ones (bias unchanged). Any other state dict is returned as
    is (a weight of an unexpected width is left for the strict load to report)."""
    weight = state_dict.get(PATCH_EMBED_WEIGHT)
    if not config.conditioned or weight is None or weight.shape[1] != config.in_channels:
        return dict(state_dict)
    wide = weight.new_zeros(weight.shape[0], config.patch_embed_channels, *weight.shape[2:])
    wide[:, :config.in_channels] = weight
    logger.info("T2V weights into %s: patch_embed widened from %d to %d input channels (new channels zero)",
                config.model_id, config.in_channels, config.patch_embed_channels)
    return {**state_dict, PATCH_EMBED_WEIGHT: wide}


__all__ = ["MASKED_PIXEL_VALUE", "PATCH_EMBED_WEIGHT", "compress_mask", "generated_latent_frames",
           "given_latent_frames", "inpaint_input", "masked_video", "widen_patch_embed"]
