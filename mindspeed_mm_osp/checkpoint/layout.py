"""Checkpoint folder layout (docs/checkpoints.md) and its errors: the Megatron legacy layout and `torch_dist`.

    <dir>/latest_checkpointed_iteration.txt      "1000" (or "release")
    <dir>/iter_0001000/mp_rank_00/model_optim_rng.pt    legacy: one file per TP rank
    <dir>/iter_0001000/metadata.json, common.pt, .metadata, __R_T.distcp    torch_dist (`dist_format`)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ..errors import UserError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
RELEASE = "release"
ITER_DIR = re.compile(r"^(iter_\d{7}|release)$")
MP_DIR = re.compile(r"^mp_rank_(\d{2})$")
DIST_MARKER = "metadata.json"  # megatron's dist_checkpointing config file: its presence makes a torch_dist folder
CKPT_FORMATS = ("legacy", "torch_dist")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """Saving failed; the tracker still points at the previous checkpoint."""


def iteration_dir(root: Path | str, iteration: int | str) -> Path:
    name = RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"
    return Path(root) / name


def model_file(root: Path | str, iteration: int | str, tp_rank: int) -> Path:
    return iteration_dir(root, iteration) / f"mp_rank_{tp_rank:02d}" / MODEL_FILE


def is_dist_iteration(it_dir: Path | str) -> bool:
    """Whether an iteration folder holds a `torch_dist` checkpoint (else the legacy layout)."""
    return (Path(it_dir) / DIST_MARKER).is_file()


def tracker_path(root: Path | str) -> Path:
    return Path(root) / TRACKER_FILE


def read_tracker(root: Path | str) -> Optional[int | str]:
    """Iteration named by the tracker file, or None when there is none (nothing saved yet)."""
    path = tracker_path(root)
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()  # garbage bytes: refused below, by name
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError as exc:
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found {text!r}") from exc


def saved_tp_size(root: Path | str, iteration: int | str) -> int:
    """Number of `mp_rank_XX` directories of one iteration (its tensor-parallel size)."""
    it_dir = iteration_dir(root, iteration)
    if not it_dir.is_dir():
        raise CheckpointError(f"{it_dir}: checkpoint directory not found")
    ranks = sorted(int(m.group(1)) for d in it_dir.iterdir() if (m := MP_DIR.match(d.name)))
    if not ranks:
        raise CheckpointError(f"{it_dir}: no mp_rank_XX directories (incomplete or not a checkpoint)")
    return ranks[-1] + 1
