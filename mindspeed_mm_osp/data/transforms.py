"""Video/image transforms on [T, C, H, W] tensors (images are T = 1).

Parity with the reference: resizes call `F.interpolate(..., align_corners=True,
antialias=True)` (PyTorch's PIL-like antialiased kernels); bicubic overshoot is not
clamped, as there, so values can lie slightly outside [-1, 1] after `ae_norm`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..config.data import TransformSpec
from .geometry import center_crop_box, max_hxw_resize_size, stride_crop_box

INTERPOLATION_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"interpolation_mode must be one of {INTERPOLATION_MODES}, got {mode!r}")
    smooth = mode in ("bicubic", "bilinear")
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=True if smooth else None, antialias=smooth)


class ToTensorVideo:
    """uint8 [T, C, H, W] → float32 in [0, 1] (layout unchanged)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise TypeError(f"ToTensorVideo expects a 4-D uint8 tensor, got {x.dtype} {tuple(x.shape)}")
        return x.float().div_(255.0)


class CenterCropResizeVideo:
    """Centre crop to the target's aspect (banker's-rounded offsets), then resize to `size`.

    The reference resizes even when the crop already has the target size; with align_corners=True
    that resize is the identity up to float rounding (the cubic kernel is 1 at 0 and 0 at
    ±1, ±2), so it is skipped here — it was ~90% of a 33×256×256 sample's CPU time.
    """

    def __init__(self, size: Sequence[int], top_crop: bool = False, interpolation_mode: str = "bilinear"):
        self.size = (int(size[0]), int(size[1]))
        self.top_crop = top_crop
        self.mode = interpolation_mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        box = center_crop_box(x.shape[-2], x.shape[-1], *self.size, top_crop=self.top_crop)
        x = x[..., box.top:box.top + box.height, box.left:box.left + box.width]
        return x if (box.height, box.width) == self.size else resize(x, self.size, self.mode)


class MaxHWStrideResizeVideo:
    """Multi-resolution resize: shrink to area `max_hxw` (5-ratio: cover the nearest ratio's
    box); skipped when the size is unchanged. Pairs with SpatialStrideCropVideo."""

    def __init__(self, max_hxw: int, force_5_ratio: bool = True, hw_stride: int = 16,
                 interpolation_mode: str = "bilinear"):
        self.max_hxw, self.force_5_ratio, self.hw_stride, self.mode = max_hxw, force_5_ratio, hw_stride, interpolation_mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = max_hxw_resize_size(h, w, self.max_hxw, self.force_5_ratio, self.hw_stride)
        return x if size == (h, w) else resize(x, size, self.mode)


class SpatialStrideCropVideo:
    """Centred crop (5-ratio: to the nearest ratio) with both sides multiples of `stride`."""

    def __init__(self, stride: int = 16, force_5_ratio: bool = True):
        self.stride, self.force_5_ratio = stride, force_5_ratio

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        box = stride_crop_box(x.shape[-2], x.shape[-1], self.stride, self.force_5_ratio)
        return x[..., box.top:box.top + box.height, box.left:box.left + box.width]


def ae_norm(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1]."""
    return x.mul(2.0).sub_(1.0)


class Compose:
    def __init__(self, steps: Sequence[Callable]):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


_REGISTRY = {"ToTensorVideo": ToTensorVideo, "CenterCropResizeVideo": CenterCropResizeVideo,
             "MaxHWStrideResizeVideo": MaxHWStrideResizeVideo, "SpatialStrideCropVideo": SpatialStrideCropVideo}


def build_pipeline(specs: Sequence[TransformSpec]) -> Compose:
    steps = []
    for spec in specs:
        if spec.trans_type == "ae_norm":
            steps.append(ae_norm)
        else:
            steps.append(_REGISTRY[spec.trans_type](**spec.param))
    return Compose(steps)


def default_pipeline(preprocess) -> Compose:
    """The pipeline implied by the resolution settings when data.json lists none."""
    if preprocess.force_resolution:
        spatial = [CenterCropResizeVideo((preprocess.max_height, preprocess.max_width), interpolation_mode="bicubic")]
    else:
        spatial = [MaxHWStrideResizeVideo(preprocess.max_hxw, preprocess.force_5_ratio, preprocess.hw_stride, "bicubic"),
                   SpatialStrideCropVideo(preprocess.hw_stride, preprocess.force_5_ratio)]
    return Compose([ToTensorVideo(), *spatial, ae_norm])


__all__ = ["CenterCropResizeVideo", "Compose", "MaxHWStrideResizeVideo", "SpatialStrideCropVideo", "ToTensorVideo",
           "ae_norm", "build_pipeline", "default_pipeline", "resize"]
