"""The two checkpoint formats behind one save and one load (docs/checkpoints.md): a save writes the format
`--ckpt-format` names, a load finds out which one the iteration folder holds, so `--load` takes either."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from . import checkpointing, dist_format
from .checkpointing import LoadedCheckpoint
from .layout import CKPT_FORMATS, CheckpointError, is_dist_iteration, iteration_dir, read_tracker


def save_checkpoint(save_dir: Path | str, iteration: int, model: nn.Module, optimizer=None, scheduler=None, *,
                    ckpt_format: str = "legacy", **kwargs) -> Path:
    """`checkpointing.save_checkpoint` (legacy) or `dist_format.save` (torch_dist), same arguments; collective.
    Returns this TP rank's file (legacy) or the iteration folder (torch_dist)."""
    if ckpt_format not in CKPT_FORMATS:
        raise CheckpointError(f"checkpoint format {ckpt_format!r}: expected one of {CKPT_FORMATS}")
    save = dist_format.save if ckpt_format == "torch_dist" else checkpointing.save_checkpoint
    return save(save_dir, iteration, model, optimizer, scheduler, **kwargs)


def load_checkpoint(load_dir: Path | str, model: nn.Module, optimizer=None, scheduler=None, *,
                    iteration: Optional[int] = None, **kwargs) -> Optional[LoadedCheckpoint]:
    """`checkpointing.load_checkpoint`, for a folder of either format: a torch_dist iteration is read at this
    run's TP/CP/DP layout, a legacy one at its own TP size. None when there is no tracker (fresh start)."""
    load_dir = Path(load_dir)
    found = iteration if iteration is not None else read_tracker(load_dir)
    if found is not None and is_dist_iteration(iteration_dir(load_dir, found)):
        return dist_format.load(iteration_dir(load_dir, found), model, optimizer, scheduler, **kwargs)
    return checkpointing.load_checkpoint(load_dir, model, optimizer, scheduler, iteration=iteration, **kwargs)


__all__ = ["load_checkpoint", "save_checkpoint"]
