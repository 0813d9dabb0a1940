"""Checkpoint files (`torch.save` payloads) through the package's one atomic write (`io_atomic`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..io_atomic import atomic_write


def _write_payload(obj: Any, f: BinaryIO) -> None:
    torch.save(obj, f)


def atomic_save(obj: Any, path: Path | str) -> None:
    """`torch.save` that leaves either the old file or the complete new one, never a partial file."""
    atomic_write(path, lambda f: _write_payload(obj, f))


__all__ = ["atomic_save"]
