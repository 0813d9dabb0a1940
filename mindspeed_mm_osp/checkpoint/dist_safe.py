"""Reading a torch_dist folder's two pickles without letting them run code (docs/security.md), both through the
package's pickle policy (`safe_load`).

* `common.pt` (the non-tensor state, written by megatron with `torch.save`) is read by `load_torch_file`:
  `weights_only=True` and no extra global at all, since everything we put there is plain containers, numbers,
  strings and tensors.
* `.metadata` (PyTorch DCP's index of the shard files) is a plain pickle that DCP itself unpickles in full.
  `read_dcp_metadata` reads it first with `load_dcp_index` (DCP's own metadata classes, torch sizes and dtypes
  only), so a file naming any other global is refused before megatron's loader opens it. It also checks that every
  entry is a tensor: DCP unpickles non-tensor ("bytes") entries in full, and our format has none.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from .layout import CheckpointError
from .safe_load import UntrustedPickleError, load_dcp_index, load_torch_file

COMMON_FILE = "common.pt"
DCP_METADATA = ".metadata"


def read_dcp_metadata(it_dir: Path) -> Any:
    """DCP's `Metadata` of a torch_dist folder, through the allow-list of `load_dcp_index`; every entry a tensor."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = Path(it_dir) / DCP_METADATA
    try:
        metadata = load_dcp_index(path)
    except UntrustedPickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint index (truncated or corrupt): "
                              f"{type(exc).__name__}: {exc}") from exc
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
