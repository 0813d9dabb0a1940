"""Crash-safe file writes: temp file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import torch


def _write_payload(obj: Any, f: BinaryIO) -> None:
    torch.save(obj, f)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: Path | str) -> None:
    """`torch.save` that leaves either the old file or the complete new one, never a partial file."""
    _atomic_write(Path(path), lambda f: _write_payload(obj, f))


def atomic_write_text(path: Path | str, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))
