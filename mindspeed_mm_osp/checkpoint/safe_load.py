"""The one policy for torch pickle files (docs/security.md): no file we did not write ourselves runs code.

A `.pt`/`.ckpt` file is a pickle, and unpickling can call any Python function the file names. Every torch file
the package reads (training checkpoints, released and merged weights, WF-VAE checkpoints) goes through
`load_torch_file`, which loads with `weights_only=True`: tensors, plain containers and numbers, plus the globals of
an explicit allow-list and nothing else. Libraries may widen torch's process-wide allow-list at import
(megatron-core adds argparse, pathlib, io and its own classes); that list is set aside while we load, so what a
file may name is exactly the list given here. A file naming any other global is refused with one line that names
the file and the global. The one way around it is `--trust-pickle FILE` on the command line, for that file only.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .layout import CheckpointError

logger = logging.getLogger(__name__)

# What a training checkpoint written by versions before 4 needs: the numpy RNG state (an array of uint32).
# Both spellings of `_reconstruct`: numpy 1.x writers name it numpy.core, numpy 2.x numpy._core.
LEGACY_CHECKPOINT_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
                             "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")

_trusted: frozenset[Path] = frozenset()


class UntrustedPickleError(CheckpointError):
    """A file needs a global outside the allow-list; the message names the file, the global and the fix."""


def trust_pickle(paths: Iterable[str | Path]) -> None:
    """Trust exactly these files (the command line's `--trust-pickle`, repeatable) to be unpickled in full."""
    global _trusted
    resolved = []
    for path in paths:
        if not Path(path).is_file():
            raise CheckpointError(f"--trust-pickle {path}: no such file (name each file to trust, not a folder)")
        resolved.append(Path(path).resolve())
    _trusted = frozenset(resolved)


def _known_globals() -> dict:
    """Allow-list name -> what `torch.serialization.safe_globals` takes for it (the object, or the object and the
    name a file spells it with)."""
    import numpy as np
    from numpy.dtypes import UInt32DType

    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype, "numpy.dtypes.UInt32DType": UInt32DType,
            "numpy._core.multiarray._reconstruct": (reconstruct, "numpy._core.multiarray._reconstruct"),
            "numpy.core.multiarray._reconstruct": (reconstruct, "numpy.core.multiarray._reconstruct")}


def allow_list(names: Sequence[str]) -> list:
    """The objects behind `names`, each one of LEGACY_CHECKPOINT_GLOBALS."""
    if not names:
        return []
    known = _known_globals()
    return [known[name] for name in names]


def _forbidden(path: Path, exc: Exception) -> list[str]:
    """The globals the file needs beyond the allow-list (read without executing anything)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: the unpickler's message names the first one
        found = []
    if found:
        return sorted(found)
    match = re.search(r"GLOBAL (\S+) was not an allowed global|but got <class '([^']+)'>", str(exc))
    return [match.group(1) or match.group(2)] if match else []


def _refusal(path: Path, what: str, names: list[str]) -> UntrustedPickleError:
    return UntrustedPickleError(
        f"{path}: refused to load this {what}: it needs the Python global(s) {', '.join(names)}, outside the "
        f"allow-list (unpickling it could run "
        f"code). Convert it with a tool you trust (docs/security.md), or, if you trust this file, pass "
        f"--trust-pickle {path}")


def load_torch_file(path: Path | str, what: str, allow: Sequence[str] = (), mmap: bool = False) -> Any:
    """`torch.load` of `path` on the CPU with `weights_only=True` and exactly the globals named in `allow`.

    `what` names the kind of file in the refusal. Raises `UntrustedPickleError` for a file that needs another
    global; other failures (truncated, corrupt, not a torch file) propagate for the caller to name. `mmap`: map
    the file instead of reading it (tensors are read when touched; zip-format files only).
    """
    path = Path(path)
    if path.resolve() in _trusted:
        logger.warning("%s: unpickled in full because of --trust-pickle; it can run code", path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    process_wide = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with torch.serialization.safe_globals(allow_list(allow)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as exc:
                names = _forbidden(path, exc)
                if names:
                    raise _refusal(path, what, names) from None
                raise  # damaged pickle data: the caller reports the file as corrupt
    finally:
        torch.serialization.add_safe_globals(process_wide)


# The globals of PyTorch Distributed Checkpoint's index file (`.metadata` of a torch_dist folder): its own metadata
# dataclasses and enums, torch.Size, and torch dtypes (checked by type in `_IndexUnpickler`).
_DCP = "torch.distributed.checkpoint."
DCP_INDEX_GLOBALS = frozenset({
    ("torch", "Size"), ("torch.serialization", "_get_layout"), (_DCP + "filesystem", "_StorageInfo"),
    *((_DCP + "metadata", name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                             "TensorStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((_DCP + "planner", name) for name in ("SavePlan", "TensorWriteData", "WriteItem", "WriteItemType")),
})


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in DCP_INDEX_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise UntrustedPickleError(f"refused: it needs the Python global {module}.{name}, outside the allow-list "
                                       "(unpickling it could run code)")
        return super().find_class(module, name)


def load_dcp_index(path: Path | str) -> Any:
    """A torch_dist folder's `.metadata` (a plain pickle, which DCP itself loads in full), unpickled resolving only
    `DCP_INDEX_GLOBALS` and torch dtypes. Raises `UntrustedPickleError` (naming the file and the global) for any
    other; damaged data propagates for the caller to name."""
    path = Path(path)
    try:
        return _IndexUnpickler(io.BytesIO(path.read_bytes())).load()
    except UntrustedPickleError as exc:
        raise UntrustedPickleError(f"{path}: {exc}") from None


__all__ = ["DCP_INDEX_GLOBALS", "LEGACY_CHECKPOINT_GLOBALS", "UntrustedPickleError", "load_dcp_index",
           "load_torch_file", "trust_pickle"]
