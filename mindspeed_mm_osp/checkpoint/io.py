"""Checkpoint files (`torch.save` payloads) through the package's one atomic write (`io_atomic`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..io_atomic import atomic_write
from .manifest import DigestWriter, FileDigest


def _write_payload(obj: Any, f: BinaryIO) -> None:
    torch.save(obj, f)


def atomic_save(obj: Any, path: Path | str) -> FileDigest:
    """`torch.save` that leaves either the old file or the complete new one, never a partial file; returns the
    size and checksum of what was written (for the iteration's manifest)."""
    digests: list[FileDigest] = []

    def write(f) -> None:
        writer = DigestWriter(f)
        _write_payload(obj, writer)
        digests.append(writer.digest())

    atomic_write(path, write)
    return digests[-1]


__all__ = ["atomic_save"]
