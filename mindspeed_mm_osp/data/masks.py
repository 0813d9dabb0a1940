"""Which frames of a training clip are given and which are generated (image-to-video / continuation training).

The mask types are Open-Sora Plan 1.3's: t2iv (generate every frame), i2v (first frame given), transition (first
and last given), continuation (the first k given), clear (every frame given), random_temporal (k random frames
given). A sample's type and k are drawn from the dataset's per-sample keyed RNG (seed, epoch, slot, attempt), after
its frames and caption, so the mask depends on nothing but the sample's key: TP peers agree without communicating
and a resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config.data import MaskConfig


def frame_mask(mask_type: str, num_frames: int, rng: np.random.Generator, *, min_clear_ratio: float = 0.0,
               max_clear_ratio: float = 1.0) -> torch.Tensor:
    """(num_frames,) float32, 1 = generate, 0 = given."""
    mask = torch.ones(num_frames)
    if mask_type == "t2iv":
        return mask
    if mask_type == "clear":
        return mask.zero_()
    if mask_type == "i2v":
        mask[0] = 0
    elif mask_type == "transition":
        mask[[0, -1]] = 0
    elif mask_type in ("continuation", "random_temporal"):
        k = int(rng.integers(math.floor(num_frames * min_clear_ratio), math.ceil(num_frames * max_clear_ratio) + 1))
        given = np.arange(k) if mask_type == "continuation" else rng.choice(num_frames, size=k, replace=False)
        mask[torch.from_numpy(np.asarray(given, dtype=np.int64))] = 0
    else:
        raise ValueError(f"unknown mask type {mask_type!r}")
    return mask


class MaskDrawer:
    """Draws a sample's mask type (video or image table by frame count) and its frame mask."""

    def __init__(self, config: MaskConfig):
        self.config = config
        self.tables = {}
        for key, table in (("video", config.mask_type_ratio_dict_video), ("image", config.mask_type_ratio_dict_image)):
            names = sorted(table)  # a fixed order: the draw must not depend on the JSON's key order
            weights = np.array([table[n] for n in names], dtype=np.float64)
            self.tables[key] = (names, weights / weights.sum())

    def __call__(self, num_frames: int, rng: np.random.Generator) -> tuple[str, torch.Tensor]:
        names, probs = self.tables["image" if num_frames == 1 else "video"]
        mask_type = names[int(rng.choice(len(names), p=probs))]
        return mask_type, frame_mask(mask_type, num_frames, rng, min_clear_ratio=self.config.min_clear_ratio,
                                     max_clear_ratio=self.config.max_clear_ratio)


__all__ = ["MaskDrawer", "frame_mask"]
