"""GroupLength collate: stack one micro-batch of clips and build its latent-grid mask.

Videos are zero-padded at the end of T/H/W to what the VAE and the patch embedding need:
`Tp = roundup(T − 1 + a_t, a_t·p_t) + 1 − a_t`, `Hp = roundup(H, a·p)`, `Wp = roundup(W, a·p)`.
`latent_mask` (B, T', H', W') is 1 on each sample's valid latent box
`(ceil((T−1)/a_t) + 1, ceil(H/a), ceil(W/a))` — on the VAE grid, not the patch grid. With the
shape-grouped sampler the batch has one shape (checked) and, for valid configs, no padding.
Image-to-video items also carry `frame_mask` (T,), stacked to (B, Tp) in an `I2VBatch`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config.data import CollateParam
from .batch import I2VBatch, PixelBatch, stack_text, sum_read_failures


def _roundup(x: int, m: int) -> int:
    return -(-x // m) * m


class GroupLengthCollate:
    def __init__(self, param: CollateParam):
        self.ae_stride, self.ae_stride_t = param.ae_stride, param.ae_stride_t
        self.ds = param.ae_stride * param.patch_size
        self.ds_t = param.ae_stride_t * param.patch_size_t

    def __call__(self, items: list[dict]) -> PixelBatch:
        shapes = {tuple(it["video"].shape) for it in items}
        if len(shapes) != 1:
            raise ValueError(f"a micro-batch must have one shape, got {sorted(shapes)}")
        c, t, h, w = shapes.pop()
        a, at = self.ae_stride, self.ae_stride_t
        tp = _roundup(t - 1 + at, self.ds_t) + 1 - at
        hp, wp = _roundup(h, self.ds), _roundup(w, self.ds)
        video = torch.stack([F.pad(it["video"], (0, wp - w, 0, hp - h, 0, tp - t)) for it in items])
        if torch.isnan(video).any():
            raise ValueError("NaN in a video batch")
        mask = torch.zeros(len(items), (tp - 1) // at + 1, hp // a, wp // a, dtype=video.dtype)
        mask[:, :math.ceil((t - 1) / at) + 1, :math.ceil(h / a), :math.ceil(w / a)] = 1
        fields = dict(video=video, latent_mask=mask, text=stack_text(items), read_failures=sum_read_failures(items))
        if "frame_mask" in items[0]:  # image-to-video: padded frames are "generated" (and outside latent_mask)
            frame_mask = torch.stack([F.pad(it["frame_mask"], (0, tp - t), value=1.0) for it in items])
            return I2VBatch(**fields, frame_mask=frame_mask)
        return PixelBatch(**fields)


__all__ = ["GroupLengthCollate"]
