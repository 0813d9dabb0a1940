"""Reading checkpoints: the one place that opens a training checkpoint or a weights file.

Used by resume (`checkpointing.load_checkpoint`), by the converter (`convert`) and by runtime weight loading
(`weights`, training's `from_pretrained` and inference). Two formats (docs/checkpoints.md):

* a training checkpoint in the Megatron legacy layout, read as a `SavedCheckpoint` (every TP rank of one
  iteration) or, for resume, as one `RankFile`. Checked here, with errors naming the file: every rank folder
  and file present, each file holding a `model` entry, and the TP size and iteration it records equal to its
  folder's;
* a flat weights file (`load_weights`, or one TP rank's shard of it with `load_weights_shard`, which reads
  only that shard): safetensors, or a torch file holding a state dict, possibly wrapped.

Another on-disk format goes here and nowhere else: `read_rank_file` is the one read of a training checkpoint,
`load_weights` the one read of a weights file. Both unpickle through `safe_load` (no file runs code), and a
training checkpoint is checked against its iteration's manifest before it is unpickled (`manifest`: sizes
always, checksums with `verify`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from .layout import (ITER_DIR, MODEL_FILE, MP_DIR, RELEASE, CheckpointError, iteration_dir, model_file, read_tracker,
                     saved_tp_size, tracker_path)
from .manifest import tensors_checksum, verify_files
from .safe_load import LEGACY_CHECKPOINT_GLOBALS, UntrustedPickleError, load_torch_file

# The safetensors metadata key of a merged file's checksum (`manifest.tensors_checksum`).
TENSORS_CHECKSUM_KEY = "tensors_xxh3_64"


@dataclass(frozen=True)
class RankFile:
    """One `mp_rank_XX/model_optim_rng.pt`: its path and the dict saved in it."""

    path: Path
    state: dict

    def weights(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of entry `key` ("model" or "ema_model"), without `_extra_state` placeholders."""
        if key not in self.state:
            raise CheckpointError(f"{self.path}: no '{key}' entry (was the run trained with the EMA optimizer?); "
                                  "drop --ema to export the model weights")
        weights = {k: v for k, v in self.state[key].items() if not k.endswith("_extra_state")}
        bad = [k for k, v in weights.items() if not torch.is_tensor(v)]
        if bad:
            raise CheckpointError(f"{self.path}: '{key}' has non-tensor entries {bad[:5]}")
        return weights


@dataclass(frozen=True)
class SavedCheckpoint:
    """Every TP rank file of one iteration of a training checkpoint, in rank order."""

    directory: Path  # the iteration folder
    iteration: int | str
    ranks: tuple[RankFile, ...]

    @property
    def tp_size(self) -> int:
        return len(self.ranks)

    @property
    def files(self) -> list[Path]:
        return [rank.path for rank in self.ranks]

    @property
    def lora(self) -> Optional[dict]:
        """The LoRA metadata of an adapter checkpoint (None for a full-model checkpoint)."""
        return self.ranks[0].state.get("lora")

    def has(self, key: str) -> bool:
        return all(key in rank.state for rank in self.ranks)


def locate_iteration(load_dir: Path | str, iteration: Optional[int | str] = None) -> tuple[Path, int | str]:
    """(iteration folder, iteration) for a checkpoint root (tracker or `iteration`) or an `iter_XXXXXXX` folder."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise CheckpointError(f"{load_dir}: checkpoint directory not found")
    if ITER_DIR.match(load_dir.name) and any(MP_DIR.match(d.name) for d in load_dir.iterdir()):
        it = RELEASE if load_dir.name == RELEASE else int(load_dir.name[len("iter_"):])
        if iteration is not None and str(iteration) != str(it):
            raise CheckpointError(f"{load_dir}: is iteration {it}, but --iteration {iteration} was asked")
        return load_dir, it
    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            raise CheckpointError(f"{load_dir}: no {tracker_path(load_dir).name} and not an iter_XXXXXXX folder; "
                                  "pass a checkpoint root written by pretrain.py (or one iteration folder)")
    it_dir = iteration_dir(load_dir, iteration)
    if not it_dir.is_dir():
        raise CheckpointError(f"{it_dir}: iteration {iteration} not found in {load_dir}")
    return it_dir, iteration


def _rank_files(root: Path, iteration: int | str) -> list[Path]:
    """`mp_rank_XX/model_optim_rng.pt` for ranks 0..TP-1; any other layout or a missing rank raises."""
    it_dir = iteration_dir(root, iteration)
    subdirs = [d for d in sorted(it_dir.iterdir()) if d.is_dir()]
    unknown = [d.name for d in subdirs if not MP_DIR.match(d.name)]
    if unknown:
        raise CheckpointError(f"{it_dir}: unknown checkpoint layout, folders {unknown} are not mp_rank_XX "
                              "(pipeline/expert-parallel checkpoints are not supported)")
    ranks = sorted(int(MP_DIR.match(d.name).group(1)) for d in subdirs)
    if not ranks:
        raise CheckpointError(f"{it_dir}: no mp_rank_XX folders (incomplete save or not a checkpoint)")
    missing = sorted(set(range(ranks[-1] + 1)) - set(ranks))
    if missing:
        raise CheckpointError(f"{it_dir}: TP rank folder(s) {['mp_rank_%02d' % r for r in missing]} missing "
                              f"(found {['mp_rank_%02d' % r for r in ranks]}); the checkpoint is incomplete")
    files = [model_file(root, iteration, r) for r in ranks]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{absent[0]}: checkpoint file missing ({len(absent)} rank(s) without {MODEL_FILE})")
    return files


def read_rank_file(path: Path, tp_size: int, iteration: int | str,
                   required: Sequence[str] = ("model",)) -> RankFile:
    """Load one rank file and check it against its folder (TP size, iteration) and the entries `required`."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found (incomplete save or wrong --load directory)")
    try:
        state = load_torch_file(path, "training checkpoint", LEGACY_CHECKPOINT_GLOBALS)
    except UntrustedPickleError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt file): {exc}") from exc
    absent = [key for key in required if not isinstance(state, dict) or key not in state]
    if absent:
        raise CheckpointError(f"{path}: unknown layout, not a {MODEL_FILE} (no '{absent[0]}' entry)")
    file_tp = state.get("parallel", {}).get("tensor_model_parallel_size", tp_size)
    if file_tp != tp_size:
        raise CheckpointError(f"{path}: written by a run with tensor-parallel size {file_tp}, but the folder has "
                              f"{tp_size} mp_rank_XX folders")
    file_it = state.get("iteration")
    if iteration != RELEASE and file_it is not None and int(file_it) != int(iteration):
        raise CheckpointError(f"{path}: holds iteration {file_it}, expected {iteration}")
    return RankFile(path, state)


def read_checkpoint(load_dir: Path | str, iteration: Optional[int | str] = None,
                    verify: bool = False) -> SavedCheckpoint:
    """Every TP rank of one iteration (the tracker's by default) of a root or of one `iter_XXXXXXX` folder;
    `verify`: compare checksums with the manifest, not only sizes."""
    it_dir, it = locate_iteration(load_dir, iteration)
    files = _rank_files(it_dir.parent, it)
    verify_files(it_dir, files, checksums=verify, complete=True)
    return SavedCheckpoint(it_dir, it, tuple(read_rank_file(path, len(files), it) for path in files))


def read_rank(load_dir: Path | str, iteration: int | str, tp_rank: int, tp_size: int,
              verify: bool = False) -> RankFile:
    """This TP rank's file of `iteration`, for resuming a run of TP size `tp_size`; `verify` as `read_checkpoint`."""
    saved_tp = saved_tp_size(load_dir, iteration)
    if saved_tp != tp_size:
        raise CheckpointError(f"{iteration_dir(load_dir, iteration)}: saved with tensor-parallel size {saved_tp}, "
                              f"this run uses {tp_size}; resume with --tensor-model-parallel-size {saved_tp} or "
                              "re-split it")
    path = model_file(load_dir, iteration, tp_rank)
    if path.exists():
        verify_files(path.parent.parent, [path], checksums=verify)
    return read_rank_file(path, tp_size, iteration, ("model", "iteration"))


# A rank maps about an eighth of its shard's bytes of the file at a time (within these bounds): pages read but not
# kept (the other ranks' pieces of a tensor split along its rows' width) then cost at most that much memory.
_WINDOW_BYTES = (16 << 20, 1 << 30)
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _window(path: Path, tp_size: int) -> int:
    low, high = _WINDOW_BYTES
    return min(max(path.stat().st_size // (8 * tp_size), low), high)


def _windows(sizes: Sequence[tuple[str, int]], window: int) -> Iterator[list[str]]:
    """Consecutive groups of keys whose tensors add up to about `window` bytes; one group is mapped at a time."""
    group, total = [], 0
    for key, nbytes in sizes:
        if group and total + nbytes > window:
            yield group
            group, total = [], 0
        group.append(key)
        total += nbytes
    if group:
        yield group


def _own_piece(key: str, view, shape: Sequence[int], tp_rank: int, tp_size: int,
               whole: Callable[[], torch.Tensor]) -> torch.Tensor:
    """This rank's piece of a tensor (or safetensors slice) still in the file's mapping, copied out; `whole()`
    gives the tensor a rank keeps whole."""
    from ..models.predictor import tp_slice

    piece = tp_slice(key, shape, tp_rank, tp_size)
    if piece is None:
        return whole().clone()
    dim, start, length = piece
    return view[(slice(None),) * dim + (slice(start, start + length),)].clone()


class _LazyTensors(Mapping):
    """The tensors of a safetensors file, each read (through its own mapping) when asked for: a checksum over it
    holds one tensor in memory at a time."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._path, self._open = path, safe_open
        with safe_open(str(path), "pt") as handle:
            self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        with self._open(str(self._path), "pt") as handle:
            return handle.get_tensor(key).clone()

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _verify_safetensors(path: Path) -> None:
    """Compare the tensors' checksum with the one recorded in the file's metadata, when it has one."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        expected = (handle.metadata() or {}).get(TENSORS_CHECKSUM_KEY)
    if expected is None:
        return
    found = tensors_checksum(_LazyTensors(path))
    if found != expected:
        raise CheckpointError(f"{path}: tensor checksum {found} differs from the {expected} recorded when it was "
                              "written (damaged copy); copy or convert it again")


def _safetensors_shard(path: Path, tp_rank: int, tp_size: int, verify: bool) -> dict[str, torch.Tensor]:
    """This TP rank's piece of every tensor, through `safe_open` slices, one window of the file at a time."""
    from safetensors import safe_open

    if verify:
        _verify_safetensors(path)
    with safe_open(str(path), "pt") as handle:
        sizes = [(key, math.prod(view.get_shape()) * _DTYPE_BYTES.get(view.get_dtype(), 4))
                 for key in handle.keys() for view in (handle.get_slice(key),)]
    out = {}
    for group in _windows(sizes, _window(path, tp_size)):
        with safe_open(str(path), "pt") as handle:
            for key in group:
                view = handle.get_slice(key)
                out[key] = _own_piece(key, view, view.get_shape(), tp_rank, tp_size, lambda: handle.get_tensor(key))
    return out


def _torch_file_mapped(path: Path) -> tuple[object, bool]:
    """(the loaded object, whether it is memory-mapped): a torch file loaded with `mmap=True` (tensors stay in
    the file until touched), or read whole when it predates the zip format, which cannot be mapped."""
    try:
        return load_torch_file(path, "weights file", mmap=True), True
    except CheckpointError:
        raise
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise
        return load_torch_file(path, "weights file"), False


def _flat_tensors(path: Path, state) -> dict[str, torch.Tensor]:
    """The state dict of a weights file, unwrapped from `ema_state_dict`/`model`/`state_dict`, without
    `_extra_state` entries; anything else than a non-empty flat dict of tensors is refused, naming the file."""
    from ..models.predictor import strip_extra_state, unwrap_state_dict

    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: unknown layout, expected a state dict, got {type(state).__name__}")
    state = strip_extra_state(unwrap_state_dict(state))
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad or not state:
        raise CheckpointError(f"{path}: unknown layout, not a flat state dict of tensors "
                              f"({'empty' if not state else f'non-tensor entries {bad[:5]}'})")
    return state


def _torch_file_shard(path: Path, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """This TP rank's piece of every tensor of a memory-mapped torch file, one window of the file at a time (each
    window maps the file anew; dropping it unmaps what was read)."""
    state, mapped = _torch_file_mapped(path)
    state = _flat_tensors(path, state)
    sizes = [(key, value.numel() * value.element_size()) for key, value in state.items()]
    out = {}
    for group in _windows(sizes, _window(path, tp_size) if mapped else sum(n for _, n in sizes)):
        state = state or _flat_tensors(path, _torch_file_mapped(path)[0])
        for key in group:
            value = state[key]
            out[key] = _own_piece(key, value, value.shape, tp_rank, tp_size, lambda: value)
        state = None
    return out


def load_weights_shard(path: Path | str, tp_rank: int, tp_size: int, verify: bool = False) -> dict[str, torch.Tensor]:
    """This tensor-parallel rank's shard (`models.predictor.tp_layout`) of merged or released predictor weights
    (.safetensors, or a torch file possibly wrapped in `ema_state_dict`/`model`/`state_dict`), without
    `_extra_state` entries, reading only what the rank keeps: safetensors through `safe_open` slices, a torch
    file memory-mapped (`safe_load.load_torch_file(mmap=True)`, weights only). `verify`: check the checksum a merged
    safetensors file carries (one tensor in memory at a time)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = _safetensors_shard(path, tp_rank, tp_size, verify)
        else:
            state = _torch_file_shard(path, tp_rank, tp_size)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    return _flat_tensors(path, state)


def load_weights(path: Path | str, verify: bool = False) -> dict[str, torch.Tensor]:
    """Merged or released predictor weights, whole (the converter's input); `load_weights_shard` at TP=1."""
    return load_weights_shard(path, 0, 1, verify)


__all__ = ["RankFile", "SavedCheckpoint", "TENSORS_CHECKSUM_KEY", "load_weights", "load_weights_shard",
           "locate_iteration", "read_checkpoint",
           "read_rank", "read_rank_file"]
