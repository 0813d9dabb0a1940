"""One micro-batch: frozen encoding, flow-matching noise, predictor forward, masked loss.

Randomness is keyed, not streamed: the VAE posterior sample of a fetched micro-batch and
the sigma/noise of a trained micro-batch each come from a generator seeded by
(seed, purpose, global micro-batch index). So every TP peer draws identical noise without a
broadcast, a resumed run draws exactly what the uninterrupted run would have, and runs of
the same data at any TP, CP or DP size see the same noise.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .. import platform
from ..data.batch import Batch, I2VBatch, LatentBatch, PixelBatch, TextFeatures, TokenIds
from ..diffusion import FlowMatchingScheduler
from ..models.predictor.inpaint import compress_mask, generated_latent_frames, inpaint_input, masked_video

LossRegion = Literal["all", "generated"]


def keyed_generator(*key) -> torch.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class EncodedBatch:
    """What the predictor trains on (fp32 latents; text in the text encoders' dtype)."""

    latents: torch.Tensor            # (B, Z, t, h, w), normalised
    latent_mask: torch.Tensor        # (B, t, h, w), 1 = valid
    text: torch.Tensor               # (B, S, C_cap)
    text_mask: torch.Tensor          # (B, S)
    pooled: Optional[torch.Tensor]   # (B, P)
    # image-to-video: latent of the masked clip (B, Z, t, h, w) and the latent mask (B, s, t, h, w), 1 = generate
    condition_latents: Optional[torch.Tensor] = None
    condition_mask: Optional[torch.Tensor] = None

    def tensors(self) -> list[torch.Tensor]:
        empty = torch.zeros(0, device=self.latents.device)
        optional = (self.pooled, self.condition_latents, self.condition_mask)
        return [self.latents, self.latent_mask, self.text, self.text_mask, *(empty if t is None else t for t in optional)]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> "EncodedBatch":
        *required, pooled, condition_latents, condition_mask = tensors
        return cls(*required, *(t if t.numel() else None for t in (pooled, condition_latents, condition_mask)))

    def loss_mask(self, region: LossRegion) -> torch.Tensor:
        """(B, t, h, w) latents the loss covers: every valid one, or (region "generated", image-to-video) only the
        latent frames with at least one generated pixel frame."""
        if region == "all" or self.condition_mask is None:
            return self.latent_mask
        return self.latent_mask * generated_latent_frames(self.condition_mask)


def _squeeze_prompt(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, 1, L) -> (B, L): one caption per sample, as the collate stacks them."""
    return x.reshape(x.shape[0], -1) if x is not None and x.ndim == 3 else x


@functools.singledispatch
def _encode_latents(batch, vae, device, generator: torch.Generator):
    """(latents, condition latents, condition mask) of a collated batch; the conditions are None for text-to-video."""
    raise TypeError(f"no latent encoding for a {type(batch).__name__}")


@_encode_latents.register
def _pixel_latents(batch: PixelBatch, vae, device, generator: torch.Generator):
    return vae.encode(batch.video.to(device), generator=generator).float(), None, None


@_encode_latents.register
def _i2v_latents(batch: I2VBatch, vae, device, generator: torch.Generator):
    return _encode_with_condition(vae, batch.video.to(device), batch.frame_mask.to(device), generator)


@_encode_latents.register
def _cached_latents(batch: LatentBatch, vae, device, generator: torch.Generator):
    """Posterior parameters from the feature cache, sampled here exactly as online encoding does."""
    from ..models.ae import sample_posterior

    mean, logvar = batch.mean.to(device), batch.logvar.to(device)
    shift, scale = batch.shift.to(device, mean.dtype), batch.scale.to(device, mean.dtype)
    # in the stored (VAE) dtype, then fp32: the same rounding as VideoAutoencoder.encode
    return ((sample_posterior(mean, logvar, generator) - shift) * scale).float(), None, None


@functools.singledispatch
def _encode_text(text, text_encoders, device):
    """(hidden states, mask, pooled or None) of a batch's captions."""
    raise TypeError(f"no text encoding for a {type(text).__name__}")


@_encode_text.register
def _token_text(text: TokenIds, text_encoders, device):
    return text_encoders.encode(_squeeze_prompt(text.input_ids), _squeeze_prompt(text.attention_mask),
                                _squeeze_prompt(text.input_ids_2), _squeeze_prompt(text.attention_mask_2))


@_encode_text.register
def _cached_text(text: TextFeatures, text_encoders, device):
    return text.hidden.to(device), text.mask.to(device), None if text.pooled is None else text.pooled.to(device)


@torch.no_grad()
def encode_batch(encoders, batch: Batch, vae_generator: torch.Generator) -> EncodedBatch:
    """Collated batch (pixels or cached posteriors; token ids or cached text) -> EncodedBatch on this device."""
    device = platform.device()
    latents, condition_latents, condition_mask = _encode_latents(batch, encoders.vae, device, vae_generator)
    text, text_mask, pooled = _encode_text(batch.text, encoders.text, device)
    return EncodedBatch(latents=latents, latent_mask=batch.latent_mask.to(device).float(), text=text,
                        text_mask=text_mask.to(device), pooled=pooled, condition_latents=condition_latents,
                        condition_mask=condition_mask)


def _encode_with_condition(vae, video: torch.Tensor, frame_mask: torch.Tensor, generator: torch.Generator):
    """(clip latents, masked-clip latents, latent mask): the clip and its masked copy go through ONE (chunked) VAE
    call; the clip's posterior is sampled first, so its latents are those text-to-video training draws."""
    b = video.shape[0]
    mean, logvar = vae.encode_posterior(torch.cat([video, masked_video(video, frame_mask)]))
    latents = vae.sample_latents(mean[:b], logvar[:b], generator).float()
    condition = vae.sample_latents(mean[b:], logvar[b:], generator).float()
    _, _, _, h, w = latents.shape
    mask = compress_mask(frame_mask.float(), vae.config.vae_scale_factor[0], h, w)
    return latents, condition, mask


def model_inputs(enc: EncodedBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Keyword inputs of the predictor for one noised micro-batch, in the predictor's dtype.

    The one place a micro-batch becomes model inputs: extra conditioning (e.g. image-to-video frames carried
    by `EncodedBatch`) is added here, not in the loop.
    """
    if enc.condition_latents is not None:
        noisy_latents = inpaint_input(noisy_latents, enc.condition_latents, enc.condition_mask)
    return {
        "hidden_states": noisy_latents.to(dtype), "timestep": timesteps.to(noisy_latents.device),
        "encoder_hidden_states": enc.text.to(dtype), "attention_mask": enc.latent_mask,
        "encoder_attention_mask": enc.text_mask,
        "pooled_projections": None if enc.pooled is None else enc.pooled.to(dtype),
    }


def flow_matching_loss(predictor, scheduler: FlowMatchingScheduler, enc: EncodedBatch,
                       noise_generator: torch.Generator, dtype: torch.dtype,
                       loss_region: LossRegion = "all") -> torch.Tensor:
    """Masked velocity MSE (fp32 scalar) of one micro-batch (docs/training.md); `loss_region` see
    `EncodedBatch.loss_mask`."""
    x0 = enc.latents
    b, _, _, h, w = x0.shape
    sigmas = scheduler.sample_sigmas(b, latent_hw=(h, w), generator=noise_generator)
    noise = torch.randn(x0.shape, generator=noise_generator, dtype=torch.float32).to(x0.device)
    return velocity_loss(predictor, scheduler, enc, sigmas, noise, dtype, loss_region)


def velocity_loss(predictor, scheduler: FlowMatchingScheduler, enc: EncodedBatch, sigmas: torch.Tensor,
                  noise: torch.Tensor, dtype: torch.dtype, loss_region: LossRegion = "all") -> torch.Tensor:
    """Masked velocity MSE of `enc` noised to the given `sigmas` (B,) with `noise` (the validation loss picks both)."""
    x_t = scheduler.add_noise(enc.latents, noise, sigmas)
    pred = predictor(**model_inputs(enc, x_t, scheduler.timesteps(sigmas), dtype))
    return scheduler.loss(pred, scheduler.training_target(enc.latents, noise), mask=enc.loss_mask(loss_region),
                          sigmas=sigmas)
