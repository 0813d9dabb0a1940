"""Reading a torch_dist folder's two pickles without letting them run code (docs/security.md).

* `common.pt` (the non-tensor state, written by megatron with `torch.save`) is read by `safe_load.load_torch_file`:
  `weights_only=True` and no extra global at all, since everything we put there is plain containers, numbers,
  strings and tensors.
* `.metadata` (PyTorch DCP's index of the shard files) is a plain pickle that DCP itself reads with `pickle.load`.
  `read_dcp_metadata` reads it first with an unpickler that resolves only DCP's own metadata classes, torch sizes
  and dtypes; a file naming any other global is refused before megatron's loader opens it. It also checks that
  every entry is a tensor: DCP unpickles non-tensor ("bytes") entries in full, and our format has none.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from .layout import CheckpointError
from .safe_load import UntrustedPickleError, load_torch_file

COMMON_FILE = "common.pt"
DCP_METADATA = ".metadata"

_DCP = "torch.distributed.checkpoint."
_ALLOWED = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), (_DCP + "filesystem", "_StorageInfo"),
    *((_DCP + "metadata", name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                             "TensorStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((_DCP + "planner", name) for name in ("SavePlan", "TensorWriteData", "WriteItem", "WriteItemType")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_dcp_metadata(it_dir: Path) -> Any:
    """DCP's `Metadata` of a torch_dist folder, unpickled with the allow-list above; every entry a tensor."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = Path(it_dir) / DCP_METADATA
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as exc:
        if "is not allowed" in str(exc):
            raise UntrustedPickleError(f"{path}: refused to load this checkpoint index: it needs the Python "
                                       f"{exc}, outside the allow-list (unpickling it could run code)") from None
        raise CheckpointError(f"{path}: cannot read the checkpoint index (truncated or corrupt): {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint index ({type(exc).__name__}: {exc})") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not a PyTorch distributed checkpoint index ({type(metadata).__name__})")
    other = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if other:
        raise CheckpointError(f"{path}: non-tensor entries {other[:5]}; this format stores tensors only")
    return metadata


def read_common(it_dir: Path) -> dict:
    """The common (non-tensor) state of a torch_dist folder, loaded with `weights_only=True` and no extra global."""
    path = Path(it_dir) / COMMON_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the torch_dist checkpoint is incomplete")
    try:
        state = load_torch_file(path, "checkpoint common state")
    except UntrustedPickleError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint common state (truncated or corrupt): {exc}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("common"), dict):
        raise CheckpointError(f"{path}: unknown layout, no 'common' entry")
    return state["common"]


__all__ = ["COMMON_FILE", "DCP_METADATA", "read_common", "read_dcp_metadata"]
