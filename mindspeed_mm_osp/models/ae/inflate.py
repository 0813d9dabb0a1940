"""Initialise a WF-VAE from a 2-D (image) WF-VAE-style checkpoint by inflating its kernels.

Keys are matched by name. A 2-D kernel (out, in, kh, kw) whose model parameter is a causal 3-D kernel
(out, in, kt, kh, kw) is inflated: "tail" puts it on the last (current-frame) tap and zeros the earlier taps,
so every frame is first coded as the image model would code it alone; "average" spreads it evenly over the kt
taps, which gives the same output on a still clip. Equal shapes are copied. Keys the file lacks keep their
random init (logged); a key the model lacks, or any other shape, is an error naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointKeyError, read_weights_file, select_state_dict

logger = logging.getLogger(__name__)

INFLATE_MODES = ("tail", "average")


def inflate_kernel(weight: torch.Tensor, frames: int, mode: str = "tail") -> torch.Tensor:
    """(out, in, kh, kw) -> (out, in, frames, kh, kw) as the module docstring says."""
    if mode == "average":
        return weight.unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames
    out = weight.new_zeros(weight.shape[0], weight.shape[1], frames, *weight.shape[2:])
    out[:, :, -1] = weight
    return out


def inflate_state_dict(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], mode: str = "tail",
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The entries of `state` reshaped to `target`'s shapes (see the module docstring)."""
    unexpected = sorted(k for k in state if k not in target)
    if unexpected:
        raise CheckpointKeyError(f"{source}: {len(unexpected)} keys the WF-VAE does not have: {unexpected[:8]}")
    out, bad = {}, []
    for key, value in state.items():
        want = target[key].shape
        if value.shape == want:
            out[key] = value
        elif value.ndim == 4 and len(want) == 5 and value.shape == want[:2] + want[3:]:
            out[key] = inflate_kernel(value, want[2], mode)
        else:
            bad.append(f"{key} {tuple(value.shape)} vs model {tuple(want)}")
    if bad:
        raise CheckpointKeyError(f"{source}: shapes that cannot be inflated: {bad[:8]}; check the `ae` config")
    return out


def inflate_from_checkpoint(model: nn.Module, path: str | Path, mode: str = "tail") -> int:
    """Load the 2-D checkpoint at `path` into `model` (a WFVAE) by inflation; returns the number of keys loaded."""
    _, state = select_state_dict(read_weights_file(Path(path)))
    target = model.state_dict()
    loaded = inflate_state_dict(state, target, mode, source=str(path))
    model.load_state_dict(loaded, strict=False)
    missing = len(target) - len(loaded)
    logger.info("WF-VAE initialised from %s by %s inflation: %d tensors loaded, %d kept their init", path, mode,
                len(loaded), missing)
    return len(loaded)


__all__ = ["INFLATE_MODES", "inflate_from_checkpoint", "inflate_kernel", "inflate_state_dict"]
