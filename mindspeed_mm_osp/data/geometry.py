"""Spatial plans: which (height, width) bucket a source lands in and how to get there.

One set of functions serves both the startup filter (bucket of every record) and the
transforms (resize/crop of decoded frames), so the two can never disagree (the reference's filter
hard-codes stride 16 where its transform uses `hw_stride`). The arithmetic follows the
reference exactly: float64, Python `int()` truncation, `round()` half-to-even centre
offsets (docs/data.md, "Resolution buckets").
"""

from __future__ import annotations

import math
from typing import NamedTuple

# h:w ratios of the five-bucket multi-resolution mode, keyed (and tie-broken) in the reference's order.
FIVE_RATIOS: tuple[tuple[float, tuple[int, int]], ...] = (
    (0.56, (9, 16)), (0.75, (3, 4)), (1.00, (1, 1)), (1.33, (4, 3)), (1.78, (16, 9)))


class CropBox(NamedTuple):
    top: int
    left: int
    height: int
    width: int


def closest_ratio(h: float, w: float) -> tuple[int, int]:
    """The five-ratio bucket nearest to h/w (first one wins ties)."""
    r = h / w
    return min(FIVE_RATIOS, key=lambda kv: abs(kv[0] - r))[1]


def _five_ratio_box(rh: int, rw: int, budget: float, stride: int) -> tuple[int, int]:
    k = int(math.floor(math.sqrt(budget / (rh * rw * stride * stride))))
    if k > 0:
        return rh * k * stride, rw * k * stride
    s = math.sqrt(budget / (rh * rw))
    return int(rh * s), int(rw * s)


def max_hxw_resize_size(h: int, w: int, max_hxw: int, force_5_ratio: bool, stride: int) -> tuple[int, int]:
    """Size the multi-resolution resize produces (before the stride crop).

    Plain mode: shrink to area `max_hxw` if larger, never upscale. Five-ratio mode: cover a
    box of the nearest ratio whose area budget is `max_hxw`, or the source's own area when
    smaller (small sources get a smaller bucket instead of an upscale).
    """
    if not force_5_ratio:
        if h * w > max_hxw:
            s = math.sqrt(max_hxw / (h * w))
            return int(h * s), int(w * s)
        return h, w
    rh, rw = closest_ratio(h, w)
    budget = max_hxw if h * w > max_hxw else h * w
    bh, bw = _five_ratio_box(rh, rw, budget, stride)
    if h / w > bh / bw:
        return int(bw / w * h), bw
    return bh, int(bh / h * w)


def stride_crop_box(h: int, w: int, stride: int, force_5_ratio: bool) -> CropBox:
    """Centred crop after the multi-resolution resize: (5-ratio: to the nearest ratio, then)
    each side floored to a multiple of `stride`."""
    top = left = 0
    if force_5_ratio:
        rh, rw = closest_ratio(h, w)
        if h / w > rh / rw:
            ch, cw = int(w * rh / rw), w
        else:
            ch, cw = h, int(h * rw / rh)
        top, left, h, w = (h - ch) // 2, (w - cw) // 2, ch, cw
    sh, sw = h // stride * stride, w // stride * stride
    return CropBox(top + (h - sh) // 2, left + (w - sw) // 2, sh, sw)


def center_crop_box(h: int, w: int, th: int, tw: int, top_crop: bool = False) -> CropBox:
    """Aspect crop of CenterCropResizeVideo: the largest centred box with the target's h/w.

    Offsets use Python's `round` (half to even) like the reference: a 3-pixel excess gives offset 2.
    """
    tr = th / tw
    if h / w > tr:
        ch, cw = int(w * tr), w
    else:
        ch, cw = h, int(h / tr)
    top = 0 if top_crop else int(round((h - ch) / 2))
    return CropBox(top, int(round((w - cw) / 2)), ch, cw)


def force_resolution_min_area(h: int, w: int, max_height: int, max_width: int, min_hxw: int) -> int:
    """Source area needed so the aspect crop to the target keeps at least `min_hxw` pixels."""
    t = max_height / max_width
    r = h / w
    return math.ceil(min_hxw * max(r / t, t / r))


def multires_bucket(h: int, w: int, max_hxw: int, force_5_ratio: bool, stride: int) -> tuple[int, int]:
    """(sample_h, sample_w) of a source in multi-resolution mode (0 sides mean unusable)."""
    rh, rw = max_hxw_resize_size(h, w, max_hxw, force_5_ratio, stride)
    box = stride_crop_box(rh, rw, stride, force_5_ratio)
    return box.height, box.width


__all__ = ["CropBox", "FIVE_RATIOS", "center_crop_box", "closest_ratio", "force_resolution_min_area",
           "max_hxw_resize_size", "multires_bucket", "stride_crop_box"]
