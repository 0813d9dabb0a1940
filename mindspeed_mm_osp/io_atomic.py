"""The one crash-safe file write of the package: checkpoints, converted weights, feature caches, videos, reports.

A file appears under its final name only complete: it is written to a temporary name in the same folder,
flushed and fsynced, renamed over the target, and the folder is fsynced so the rename survives a power loss.
Any failure removes the temporary file and leaves the previous file (if any) untouched. Temporary files left
by a killed process (SIGKILL runs no cleanup) are removed by the next write of the same file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Mapping

if TYPE_CHECKING:
    import torch


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


def atomic_write(path: Path | str, write_fn: Callable[[BinaryIO], object]) -> Path:
    """Call `write_fn(f)` on a binary file opened on a temporary name, then publish it as `path`; returns `path`.

    Writers that need a file name instead of a file object (safetensors) may write to `f.name`: the fsync
    through `f` covers them, it is the same file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """`atomic_write` of UTF-8 text (trackers, JSON manifests and reports)."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def replace_dir(tmp: Path | str, path: Path | str) -> Path:
    """Publish the complete folder `tmp` as `path` by a rename (a folder of many files written by several
    processes, e.g. a torch_dist checkpoint); an older `path` is moved aside first and removed after."""
    import shutil

    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def atomic_save_safetensors(tensors: Mapping[str, "torch.Tensor"], path: Path | str,
                           metadata: dict[str, str]) -> Path:
    """A safetensors file (weights, latents, feature shards), written by name so the library streams the tensors
    to disk instead of building the whole file in memory first."""
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda f: save_file(contiguous, f.name, metadata=metadata))


__all__ = ["atomic_save_safetensors", "atomic_write", "atomic_write_text", "replace_dir"]
