"""Checkpoint and weight files written through the package's one atomic write (`io_atomic`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Mapping

import torch

from ..io_atomic import atomic_write


def _write_payload(obj: Any, f: BinaryIO) -> None:
    torch.save(obj, f)


def atomic_save(obj: Any, path: Path | str) -> None:
    """`torch.save` that leaves either the old file or the complete new one, never a partial file."""
    atomic_write(path, lambda f: _write_payload(obj, f))


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path | str, metadata: dict[str, str]) -> None:
    """A safetensors file, atomically; written by name so the library streams tensors without a copy in memory."""
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda f: save_file(contiguous, f.name, metadata=metadata))


__all__ = ["atomic_save", "atomic_save_safetensors"]
