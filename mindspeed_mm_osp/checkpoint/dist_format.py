"""The `torch_dist` checkpoint format (`--ckpt-format torch_dist`, docs/checkpoints.md): megatron-core's
dist_checkpointing (PyTorch Distributed Checkpoint underneath), resumable at any TP, CP and DP size.

An iteration folder holds DCP's `.metadata` and `__R_T.distcp` shard files, megatron's `metadata.json` and
`common.pt`, and our `manifest.json`. It carries what a legacy file carries (`checkpointing`), split in two:

* tensors, each at its global (TP=1) shape with its TP split axis (`tp_split_dim`): `model/<key>`,
  `ema_model/<param>`, `optimizer/<param>/<exp_avg|exp_avg_sq|param>`. On load DCP reads for every rank exactly its
  slice at the new layout; CP and DP ranks hold replicas, so only the TP size shapes the slices;
* common state (`common.pt`, rank 0): iteration, samples, args, LR schedule, clip state, optimizer param groups and
  per-parameter step, LoRA metadata, the saving layout, and `rng_state[tp_rank][dp_cp_rank]`.

A save is staged (`stage_save`: gather, plan; collective), written (`PendingDistSave.request`, megatron's
`AsyncRequest`, run now or by `async_save` in a background process) and finalized (`PendingDistSave.finalize`:
checksums, manifest, rename of the hidden temporary folder, tracker; collective).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..io_atomic import atomic_write_text, replace_dir
from ..models.wrappers import unwrap
from ..parallel import ParallelDims
from .async_save import AsyncSaves
from .checkpointing import (CHECKPOINT_VERSION, LoadedCheckpoint, _all_ranks_ok, _model_state, _named, _plain,
                            rng_state, _training_state, restore)
from .dist_safe import COMMON_FILE, DCP_METADATA, read_common, read_dcp_metadata
from .layout import DIST_MARKER, CheckpointError, CheckpointWriteError, iteration_dir, read_tracker, tracker_path
from .manifest import FileDigest, file_digest, read_manifest, verify_files, write_manifest
from .reader import RankFile

logger = logging.getLogger(__name__)

DIST_FORMAT = "osp-torch-dist-v1"
SECTIONS = ("model", "ema_model", "optimizer")
_STRATEGY = ("torch_dist", 1)


# ------------------------------------------------------------------------------------------------ content


def split_payload(state: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by DCP key, common state) of a legacy-shaped payload (the dict a legacy rank file holds)."""
    tensors = {f"model/{k}": v for k, v in state["model"].items() if torch.is_tensor(v)}
    tensors.update({f"ema_model/{k}": v for k, v in state.get("ema_model", {}).items()})
    common = {k: v for k, v in state.items() if k not in SECTIONS}
    if "optimizer" in state:
        opt = state["optimizer"]
        common["optimizer"] = {"format": opt["format"], "param_groups": opt["param_groups"],
                               "steps": {name: float(e.get("step", 0.0)) for name, e in opt["state"].items()}}
        for name, entry in opt["state"].items():
            tensors.update({f"optimizer/{name}/{field}": v for field, v in entry.items() if field != "step"})
    return tensors, common


def join_payload(tensors: Mapping[str, torch.Tensor], common: Mapping) -> dict:
    """Inverse of `split_payload`: the legacy-shaped payload of these tensors (any TP slicing) and common state."""
    state = {k: v for k, v in common.items() if k not in SECTIONS}
    for section in ("model", "ema_model"):
        part = {k[len(section) + 1:]: v for k, v in tensors.items() if k.startswith(section + "/")}
        if part or section == "model":
            state[section] = part
    if "optimizer" in common:
        opt = common["optimizer"]
        entries = {name: {"step": step} for name, step in opt["steps"].items()}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                name, field = key[len("optimizer/"):].rsplit("/", 1)
                entries.setdefault(name, {"step": 0.0})[field] = value
        state["optimizer"] = {"format": opt["format"], "param_groups": opt["param_groups"], "state": entries}
    return state


def tensor_name(key: str) -> str:
    """The model key or parameter name a DCP key stores (its TP split axis is that name's)."""
    section, _, rest = key.partition("/")
    return rest.rsplit("/", 1)[0] if section == "optimizer" else rest


def _sharded(key: str, data: torch.Tensor, dims: ParallelDims, index: int):
    """`data`, this rank's piece of `key`, as a megatron ShardedTensor. Of the ranks that hold the same piece,
    the one chosen round-robin by `index` writes it (replica id 0), so writing is spread over all ranks."""
    from megatron.core.dist_checkpointing import ShardedTensor

    from ..models.predictor import tp_split_dim

    axis = tp_split_dim(tensor_name(key))
    data = data.detach().contiguous()
    if axis is None or dims.tp == 1:
        return ShardedTensor.from_rank_offsets(key, data, replica_id=int(dims.rank != index % dims.world_size))
    replicas = dims.world_size // dims.tp
    return ShardedTensor.from_rank_offsets(key, data, (axis, dims.tp_rank, dims.tp),
                                           replica_id=int(dims.dp_cp_rank != index % replicas))


# ------------------------------------------------------------------------------------------------ save


@dataclass
class PendingDistSave:
    """One torch_dist save between its plan and its finalize. `request` (megatron's AsyncRequest) writes this
    rank's shard files; `finalize` publishes the folder once every rank has written."""

    save_dir: Path
    iteration: int | str
    previous: Optional[int | str]
    tmp_dir: Path
    dims: ParallelDims
    request: Any

    @property
    def final_dir(self) -> Path:
        return iteration_dir(self.save_dir, self.iteration)

    def _digests(self) -> dict[str, FileDigest]:
        """Size and checksum of the files this rank wrote (rank 0: also DCP's metadata and the common state)."""
        names = [p.name for p in self.tmp_dir.glob(f"__{self.dims.rank}_*.distcp")]
        if self.dims.rank == 0:
            names += [DCP_METADATA, COMMON_FILE, DIST_MARKER]
        return {name: file_digest(self.tmp_dir / name) for name in names}

    def finalize(self) -> Path:
        """Checksums, then rank 0 writes the manifest, renames the folder to `iter_XXXXXXX` and moves the tracker;
        collective. A failure on any rank raises `CheckpointWriteError` on all, the tracker untouched."""
        error = None
        try:
            mine = self._digests()
        except OSError as exc:
            mine, error = {}, exc
        everyone = [mine]
        if dist.is_initialized():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        if error is None and self.dims.rank == 0:
            try:
                write_manifest(self.tmp_dir, self.iteration, {k: v for d in everyone for k, v in d.items()})
                replace_dir(self.tmp_dir, self.final_dir)
                atomic_write_text(tracker_path(self.save_dir), str(self.iteration))
            except OSError as exc:
                error = exc
        if not _all_ranks_ok(error is None):
            raise CheckpointWriteError(
                f"saving checkpoint iteration {self.iteration} to {self.save_dir}: publishing it failed"
                f"{f': {error}' if error else ' on another rank'}. The tracker {tracker_path(self.save_dir)} still "
                f"names the previous checkpoint ({_named(self.previous)}).") from error
        logger.info("saved checkpoint iteration %s to %s (torch_dist)", self.iteration, self.save_dir)
        return self.final_dir


def _gather_rng(dims: ParallelDims) -> list[list[dict]]:
    """Every rank's RNG states as `[tp_rank][dp_cp_rank]`; collective."""
    mine = (dims.tp_rank, dims.dp_cp_rank, rng_state())
    everyone = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    table: list[list] = [[None] * (dims.world_size // dims.tp) for _ in range(dims.tp)]
    for tp_rank, dp_cp_rank, state in everyone:
        table[tp_rank][dp_cp_rank] = state
    return table


def _temporary_dir(save_dir: Path, iteration: int | str) -> Path:
    """Where an iteration is written before it is published: a hidden name no reader takes for a checkpoint."""
    return save_dir / f".{iteration_dir(save_dir, iteration).name}.tmp"


def stage_tensors(save_dir: Path | str, iteration: int | str, tensors: Mapping[str, torch.Tensor], common: dict,
                  dims: ParallelDims) -> PendingDistSave:
    """Plan writing `tensors` (this rank's pieces) and `common` into a fresh temporary folder; collective. Rank
    0 writes `common.pt` now; the shard files are written by the returned request."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    save_dir = Path(save_dir)
    previous, tmp_dir = read_tracker(save_dir), _temporary_dir(save_dir, iteration)
    error = None
    if dims.rank == 0:
        try:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a killed save
            tmp_dir.mkdir(parents=True)
        except OSError as exc:
            error = exc
    if _all_ranks_ok(error is None):
        sharded = {key: _sharded(key, t, dims, i) for i, (key, t) in enumerate(sorted(tensors.items()))}
        try:
            request = dist_checkpointing.save({"tensors": sharded, "common": common}, str(tmp_dir),
                                              sharded_strategy=TorchDistSaveShardedStrategy(*_STRATEGY),
                                              async_sharded_save=True)
        except OSError as exc:
            error = exc
    if not _all_ranks_ok(error is None):
        raise CheckpointWriteError(f"saving checkpoint iteration {iteration} to {save_dir}: preparing {tmp_dir} "
                                   f"failed{f': {error}' if error else ' on another rank'}. The tracker still names "
                                   f"the previous checkpoint ({_named(previous)}).") from error
    return PendingDistSave(save_dir, iteration, previous, tmp_dir, dims, request)


def save(save_dir: Path | str, iteration: int, model: nn.Module, optimizer=None, scheduler=None, *, clip=None,
         consumed_train_samples: int = 0, args: Any = None, save_optim: bool = True, save_rng: bool = True,
         lora: Optional[dict] = None, dims: Optional[ParallelDims] = None,
         async_saves: Optional[AsyncSaves] = None) -> Path:
    """`checkpointing.save_checkpoint` in the torch_dist format; returns the iteration folder. Collective.

    Memory: like the legacy save, every rank holds fp32 model-space copies of its TP slice's optimizer state
    (exp_avg, exp_avg_sq, EMA, and the master weights of bf16 parameters) while the save is staged.
    """
    started = time.monotonic()
    waited = async_saves.wait() if async_saves is not None else 0.0
    dims = dims or ParallelDims.current()
    state = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": int(iteration),
             "consumed_train_samples": int(consumed_train_samples), "args": _plain(args),
             "model": _model_state(model, lora), **({"lora": lora} if lora is not None else {}),
             **_training_state(model, optimizer, scheduler, clip, save_optim)}
    tensors, common = split_payload(state)
    common.update(format=DIST_FORMAT, parallel=_layout(dims))
    if save_rng:
        common["rng_state"] = _gather_rng(dims)
    pending = stage_tensors(save_dir, iteration, tensors, common, dims)
    if async_saves is not None:  # megatron's request writes in the background; ours publishes after it
        pending.request.add_finalize_fn(pending.finalize)
        async_saves.schedule(pending.iteration, pending.request, stalled_s=time.monotonic() - started,
                             waited_s=waited)
        return pending.final_dir
    _write_now(pending)
    logger.info("checkpoint iteration %s: training paused %.3f s for the save", iteration, time.monotonic() - started)
    return pending.final_dir


def _write_now(pending: PendingDistSave) -> None:
    """Run the write and megatron's own finalize (it raises on every rank when a rank failed), then ours."""
    try:
        pending.request.execute_sync()
    except Exception as exc:
        raise CheckpointWriteError(f"saving checkpoint iteration {pending.iteration} to {pending.save_dir}: writing "
                                   f"{pending.tmp_dir} failed: {exc}. The tracker still names the previous checkpoint "
                                   f"({_named(pending.previous)}).") from exc
    pending.finalize()


def _layout(dims: ParallelDims) -> dict:
    return {"tensor_model_parallel_size": dims.tp, "context_parallel_size": dims.cp, "data_parallel_size": dims.dp}


# ------------------------------------------------------------------------------------------------ load


def _check_on_every_rank(it_dir: Path, verify: bool) -> tuple[dict, Any]:
    """(common state, DCP metadata) after checking every file against the manifest; if any rank fails, all
    raise instead of waiting for it."""
    try:
        if read_manifest(it_dir) is None:
            raise CheckpointError(f"{it_dir}: a torch_dist folder without manifest.json (not written by this package, "
                                  "or its save did not finish); refusing it")
        verify_files(it_dir, [], checksums=verify, complete=True)
        found, error = (read_common(it_dir), read_dcp_metadata(it_dir)), None
    except CheckpointError as exc:
        found, error = None, exc
    if not _all_ranks_ok(error is None):
        raise error or CheckpointError(f"{it_dir}: another rank could not read this checkpoint")
    if found[0].get("format") != DIST_FORMAT:
        raise CheckpointError(f"{it_dir / COMMON_FILE}: format {found[0].get('format')!r} is not {DIST_FORMAT!r}")
    return found


def _local_shapes(model: nn.Module, lora: Optional[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """What this rank holds per section, for the load template: model state and trainable parameters."""
    from ..models.lora import lora_state_dict

    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    weights = lora_state_dict(unwrap(model)) if lora is not None else unwrap(model).state_dict()
    return {"model": {k: v for k, v in weights.items() if torch.is_tensor(v)}, "ema_model": params,
            "optimizer": params}


def _template(metadata, model: nn.Module, lora: Optional[dict], with_optimizer: bool, dims: ParallelDims,
              path: Path) -> dict:
    """A ShardedTensor for every stored key this run takes, shaped as this rank's piece at its layout."""
    from ..models.predictor import tp_split_dim

    local = _local_shapes(model, lora)
    out = {}
    for i, (key, meta) in enumerate(sorted(metadata.state_dict_metadata.items())):
        section, name = key.partition("/")[0], tensor_name(key)
        if section not in SECTIONS or (section != "model" and not with_optimizer) or name not in local[section]:
            continue  # unknown to this model: the strict key check of the restore names it
        shape, axis = list(local[section][name].shape), tp_split_dim(name)
        if axis is not None and axis < len(shape):
            shape[axis] *= dims.tp
        if tuple(shape) != tuple(meta.size):
            raise CheckpointError(f"{path}: {key} is {tuple(meta.size)} in the checkpoint but {tuple(shape)} in this "
                                  "model (another model config?)")
        data = torch.empty(local[section][name].shape, dtype=meta.properties.dtype)
        out[key] = _sharded(key, data, dims, i)
    return out


def _same_layout(table: list, common: Mapping, dims: ParallelDims) -> bool:
    """Whether the saved per-rank RNG table maps one to one onto this run's ranks."""
    saved_cp = common.get("parallel", {}).get("context_parallel_size", dims.cp)
    return (len(table) == dims.tp and all(len(row) == dims.world_size // dims.tp for row in table)
            and saved_cp == dims.cp)


def _take_rng(state: dict, common: Mapping, dims: ParallelDims, it_dir: Path) -> bool:
    """Leave this rank's saved RNG states in `state` when the layout is the saving one; otherwise drop them and
    return True (the caller reseeds, `_reseed`)."""
    table = state.pop("rng_state", None)
    if table is None:
        return False
    if _same_layout(table, common, dims):
        state["rng_state"] = table[dims.tp_rank]
        return False
    logger.warning("%s: saved at %s, resumed at %s: the per-rank RNG states do not map onto the new ranks; the "
                   "generators are reseeded from the saved --seed plus the iteration", it_dir, common.get("parallel"),
                   _layout(dims))
    return True


def _reseed(common: Mapping) -> None:
    """Deterministic generators for a resume at another layout: the saved run's seed plus the iteration."""
    from ..parallel import set_seed

    args = common.get("args") if isinstance(common.get("args"), Mapping) else {}
    set_seed(int(args.get("seed", 1234)) + int(common.get("iteration", 0)))


def _read_pieces(template: dict, it_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors `template` asks for, read by megatron's torch_dist loader (DCP resharding underneath). Its call
    of DCP's deprecated `load_state_dict` alias warns on every load; that warning is megatron's to fix."""
    import warnings

    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)
        return TorchDistLoadShardedStrategy().load(template, it_dir)


def load(it_dir: Path, model: nn.Module, optimizer=None, scheduler=None, *, clip=None, no_load_optim: bool = False,
         no_load_rng: bool = False, finetune: bool = False, strict: bool = True, lora: Optional[dict] = None,
         dims: Optional[ParallelDims] = None, verify: bool = False) -> LoadedCheckpoint:
    """`checkpointing.load_checkpoint` of one torch_dist iteration folder, at this run's layout; collective."""
    dims = dims or ParallelDims.current()
    common, metadata = _check_on_every_rank(it_dir, verify)
    with_optimizer = optimizer is not None and not (finetune or no_load_optim)
    template = _template(metadata, model, lora, with_optimizer, dims, it_dir)
    tensors = _read_pieces(template, it_dir) if template else {}
    state = join_payload(tensors, common)
    if not with_optimizer:
        state.pop("optimizer", None)
    load_rng = not (finetune or no_load_rng)
    reseed = load_rng and _take_rng(state, common, dims, it_dir)
    loaded = restore(RankFile(it_dir, state), model, optimizer, scheduler, clip=clip, no_load_optim=no_load_optim,
                     finetune=finetune, load_rng=load_rng, strict=strict, lora=lora, dp_rank=dims.dp_cp_rank)
    if reseed:
        _reseed(common)
    return loaded


# ------------------------------------------------------------------------------------------------ one process


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """A one-rank gloo group for the converter (megatron's save and load are collective), unless one exists."""
    if dist.is_initialized():
        yield
        return
    from .. import platform

    platform.adapt_megatron()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def read_full(it_dir: Path, verify: bool = False, sections: tuple[str, ...] = SECTIONS
              ) -> tuple[dict[str, torch.Tensor], dict]:
    """(every tensor of `sections` at its global shape, common state) of a torch_dist iteration folder, in one
    process."""
    from megatron.core.dist_checkpointing import ShardedTensor

    with one_process_group():
        common, metadata = _check_on_every_rank(it_dir, verify)
        template = {key: ShardedTensor.from_rank_offsets(key, torch.empty(tuple(m.size), dtype=m.properties.dtype))
                    for key, m in metadata.state_dict_metadata.items() if key.partition("/")[0] in sections}
        return _read_pieces(template, it_dir) if template else {}, common


def write_full(save_dir: Path | str, iteration: int | str, tensors: Mapping[str, torch.Tensor], common: dict) -> Path:
    """A torch_dist iteration from whole tensors and common state, in one process (the converter)."""
    with one_process_group():
        pending = stage_tensors(save_dir, iteration, tensors, {"format": DIST_FORMAT, **common}, ParallelDims.single())
        _write_now(pending)
        return pending.final_dir


__all__ = ["DIST_FORMAT", "PendingDistSave", "join_payload", "load", "one_process_group", "read_full", "save",
           "split_payload", "stage_tensors", "tensor_name", "write_full"]
