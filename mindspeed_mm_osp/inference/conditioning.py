"""Image-to-video and continuation sampling: given frames -> the inpaint predictor's condition.

`--image` gives the first frame, `--last-image` the last (both: a transition), `--video PATH --condition-frames k`
the first k frames of a clip. Each input is resized and centre-cropped to the output size with the training
transform (`data.transforms`: ToTensorVideo, bicubic CenterCropResizeVideo, ae_norm), placed at its frames of an
otherwise black (-1) clip, and encoded by the VAE (posterior mean, as the reconstruction tool: deterministic, so
every TP rank computes the same condition). The latent mask follows `models.predictor.inpaint`.

As in Open-Sora Plan 1.3 the condition reaches the model through its input channels only. With `reimpose`
(default; `--no-reimpose-condition` gives the reference's behaviour) every latent frame made only of given frames
is also put back on its straight path (1 - sigma) * z_cond + sigma * noise after each Euler step, so it ends at the
condition's latent exactly and the given frames of the output are their VAE round trip, however well the model has
learnt to copy them. Latent frames that mix given and generated pixel frames (the last one of a transition) are
fed through the channels only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import ConfigError
from ..data.readers import ReadError, make_video_reader, read_image
from ..data.transforms import CenterCropResizeVideo, Compose, ToTensorVideo, ae_norm
from ..errors import UserError
from ..metrics import psnr
from ..models.predictor.inpaint import MASKED_PIXEL_VALUE, compress_mask, given_latent_frames, inpaint_input
from ..models.predictor.inpaint import masked_video


@dataclass(frozen=True)
class ConditionRequest:
    """What the command line asks to condition on (paths and the continuation length)."""

    image: Optional[str] = None
    last_image: Optional[str] = None
    video: Optional[str] = None
    condition_frames: Optional[int] = None
    reimpose: bool = True

    @property
    def any(self) -> bool:
        return any(x is not None for x in (self.image, self.last_image, self.video))


def clip_frames(uint8_thwc: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (T, 3, height, width) in [-1, 1]: resized and centre-cropped as training samples are."""
    transform = Compose([ToTensorVideo(), CenterCropResizeVideo((height, width), interpolation_mode="bicubic"),
                         ae_norm])
    return transform(torch.from_numpy(np.ascontiguousarray(uint8_thwc)).permute(0, 3, 1, 2))


def read_clip(path: str, count: int) -> np.ndarray:
    """The first `count` frames of the `--video` clip, uint8 (T, H, W, 3): consecutive, at the clip's own rate."""
    try:
        return make_video_reader("decoder").read(path, np.arange(count))
    except ReadError as e:
        raise UserError(f"--video {path}: cannot read its first {count} frames ({e}); pass a clip with at least "
                        f"{count} readable frames") from e


def condition_pixels(request: ConditionRequest, frames: int, height: int, width: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (3, T, H, W) in [-1, 1] with -1 at generated frames, frame mask (T,) with 1 = generate)."""
    pixels = torch.full((frames, 3, height, width), MASKED_PIXEL_VALUE)
    mask = torch.ones(frames)

    def place(uint8_thwc: np.ndarray, at: list[int]) -> None:
        pixels[at] = clip_frames(uint8_thwc, height, width)
        mask[at] = 0

    if request.image is not None:
        place(read_image(request.image), [0])
    if request.last_image is not None:
        place(read_image(request.last_image), [frames - 1])
    if request.video is not None:
        k = request.condition_frames
        if not 1 <= k <= frames:
            raise ConfigError("command line", "--condition-frames",
                              f"must be in [1, {frames}] (the output has {frames} frames), got {k}")
        place(read_clip(request.video, k), list(range(k)))
    return pixels.permute(1, 0, 2, 3).contiguous(), mask


@dataclass
class InpaintCondition:
    """The condition of one micro-batch: masked-video latents and latent mask (B, ...), plus what `reimpose`
    needs (which latent frames are given, the initial noise)."""

    latents: torch.Tensor      # (B, C, t, h, w) fp32
    mask: torch.Tensor         # (B, s, t, h, w)
    given: torch.Tensor        # (B, 1, t, h, w) bool
    noise: torch.Tensor        # (B, C, t, h, w): the sampler's initial latents
    reimpose: bool

    @classmethod
    @torch.no_grad()
    def encode(cls, vae, pixels: torch.Tensor, frame_mask: torch.Tensor, noise: torch.Tensor,
               reimpose: bool) -> "InpaintCondition":
        b = noise.shape[0]
        device = next(vae.parameters()).device
        video = masked_video(pixels[None].to(device), frame_mask[None])
        latents = vae.normalize(vae.encode_posterior(video)[0]).float().expand(b, -1, -1, -1, -1)
        _, _, _, h, w = latents.shape
        mask = compress_mask(frame_mask[None].float(), vae.config.vae_scale_factor[0], h, w).expand(b, -1, -1, -1, -1)
        return cls(latents.cpu(), mask.cpu(), given_latent_frames(mask).cpu(), noise, reimpose)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """[x | condition | mask] for a sampler batch made of copies of this batch ([uncond; cond] under CFG)."""
        copies = x.shape[0] // self.latents.shape[0]
        latents, mask = (t.to(x.device).repeat(copies, 1, 1, 1, 1) for t in (self.latents, self.mask))
        return inpaint_input(x, latents, mask)

    def constrain(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """After a step to `sigma`: the given latent frames back on their path (identity without `reimpose`)."""
        if not self.reimpose:
            return latents
        d = latents.device
        path = (1 - sigma) * self.latents.to(d) + sigma * self.noise.to(d)
        return torch.where(self.given.to(d), path.to(latents.dtype), latents)


def condition_report(output: torch.Tensor, pixels: torch.Tensor, frame_mask: torch.Tensor, vae) -> dict:
    """PSNR (dB) over the given frames: the generated video vs the inputs, and the VAE round trip of the
    conditioning clip (encode the posterior mean, decode) vs the inputs. Videos (3, T, H, W) in [-1, 1]."""
    from .video_io import to_uint8_frames

    given = [i for i in range(frame_mask.shape[0]) if frame_mask[i] < 0.5]
    if not given:
        return {}
    device = next(vae.parameters()).device
    with torch.no_grad():
        clip = masked_video(pixels[None].to(device), frame_mask[None])
        round_trip = vae.decode(vae.normalize(vae.encode_posterior(clip)[0])).float().clamp(-1, 1).cpu()[0]
    target = to_uint8_frames(pixels[:, given])
    return {"condition_frames": given, "psnr_output_db": psnr(to_uint8_frames(output[:, given]), target),
            "psnr_vae_round_trip_db": psnr(to_uint8_frames(round_trip[:, given]), target)}


__all__ = ["ConditionRequest", "InpaintCondition", "clip_frames", "condition_pixels", "condition_report", "read_clip"]
