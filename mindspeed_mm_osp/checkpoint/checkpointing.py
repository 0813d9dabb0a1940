"""Save and resume training in the Megatron legacy layout (docs/checkpoints.md), with the reference's bugs fixed.

`iter_XXXXXXX/mp_rank_YY/model_optim_rng.pt` (written by DP rank 0 of each TP rank) holds:

| key | content |
|---|---|
| `model` | the module's `state_dict()` without `_extra_state` entries (model dtype) |
| `ema_model` | fp32 EMA weights in model space, trainable params only (gathered from the DP shards) |
| `optimizer` | `{"format": OPTIMIZER_FORMAT, "param_groups": [...], "state": {name: {exp_avg, exp_avg_sq, step, param?}}}` |
| `opt_param_scheduler` | megatron `OptimizerParamScheduler.state_dict()` |
| `rng_state` | one dict per DP rank: python, numpy, torch, accelerator and megatron tracker states |
| `args`, `iteration`, `consumed_train_samples`, `clip_state`, `checkpoint_version`, `parallel` | as named |
| `lora` | LoRA runs only: `models.lora.lora_metadata` (LoRA config, base predictor config); `model` then holds the adapters only |

Differences from the reference, on purpose:
* optimizer state in **model space** (full tensors per parameter name) instead of `distrib_optim.pt` shards:
  DP-size independent (a DP=2 save resumes at DP=1), carries `ema_params` and a per-param `step`; `param` (the
  fp32 master) is stored only for params whose model dtype is not fp32. Gathering costs one all-reduce per key
  over the DP group (gloo, CPU memory);
* `ema_model` is the fp32 EMA (the reference exported bf16) and is what resume reads back as `ema_params`;
* the EMA warm-up counter (per-param `step`) and the adaptive-clip statistics are restored;
* every file and the tracker are written atomically (temp + fsync + rename, tracker last), a failed write on any
  rank raises `CheckpointWriteError` on all ranks and leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import platform
from ..models.wrappers import unwrap
from ..errors import UserError
from ..optim import (gathers_locally, load_optimizer_state, optimizer_state_for_save, reset_optimizer_state,
                     schedule_mismatches)
from ..parallel import ParallelDims
from ..io_atomic import atomic_write_text
from .async_save import AsyncSaves, local_request
from .io import atomic_save
from .layout import CheckpointError, CheckpointWriteError, iteration_dir, model_file, read_tracker, tracker_path
from .manifest import FileDigest, write_manifest
from .reader import RankFile, read_rank

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 4.0  # 4.0: plain numpy RNG state and arguments (weights-only loadable), manifest
OPTIMIZER_FORMAT = "osp-model-space-v1"


@dataclass(frozen=True)
class LoadedCheckpoint:
    iteration: int
    consumed_train_samples: int
    args: Any
    path: Path


def _model_state(model: nn.Module, lora: Optional[dict]) -> dict[str, torch.Tensor]:
    if lora is not None:  # the frozen base is not saved: it is reloaded from its own file
        from ..models.lora import lora_state_dict

        return lora_state_dict(unwrap(model))
    return {k: platform.host_copy(v) if torch.is_tensor(v) else v
            for k, v in unwrap(model).state_dict().items() if not k.endswith("_extra_state")}


def _numpy_state_plain() -> dict:
    """numpy's global RNG state as plain values and a tensor, which a weights-only load rebuilds."""
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    return {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state) -> None:
    """Restore `_numpy_state_plain`, or the tuple `np.random.get_state()` of checkpoints before version 4."""
    if isinstance(state, dict):
        state = (state["algorithm"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                 state["cached_gaussian"])
    np.random.set_state(state)


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": _numpy_state_plain(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": platform.get_accelerator_rng_state(),
        "rng_tracker_states": {k: v.clone() for k, v in tracker.items()},
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    _set_numpy_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    platform.set_accelerator_rng_state(state["cuda_rng_state"])
    # set_states keeps the dict by reference and fork() mutates it: hand over copies.
    tensor_parallel.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["rng_tracker_states"].items()})


def _gather_rng_states(dims: ParallelDims) -> list[dict]:
    """Every DP x CP replica's RNG states (they differ), gathered to the rank that writes the file."""
    mine = rng_state()
    if not dims.distributed:
        return [mine]
    states: list = [None] * dist.get_world_size(dims.dp_cp_group)
    dist.all_gather_object(states, mine, group=dims.dp_cp_group)
    return states


def _all_ranks_ok(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    device = torch.device("cpu") if dist.get_backend() == "gloo" else platform.device()
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _plain(value: Any) -> Any:
    """The run's arguments as plain containers, numbers and strings (anything else as its text), so the file
    loads with `weights_only=True` and needs no project import."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _training_state(model: nn.Module, optimizer, scheduler, clip, save_optim: bool) -> dict:
    """The EMA, optimizer, scheduler and clip entries of the payload; collective unless the optimizer
    `gathers_locally`."""
    out: dict[str, Any] = {}
    if optimizer is not None:
        ema_model, saved = optimizer_state_for_save(unwrap(model), optimizer)
        if ema_model is not None:
            out["ema_model"] = ema_model
        if save_optim:
            out["optimizer"] = {"format": OPTIMIZER_FORMAT, **saved}
            if scheduler is not None:
                out["opt_param_scheduler"] = scheduler.state_dict()
    if clip is not None:
        out["clip_state"] = clip.state_dict()
    return out


def _gather_digests(it_dir: Path, path: Path, digest: Optional[FileDigest]) -> dict[str, FileDigest]:
    """{file relative to the iteration folder: digest} of every writer rank, for rank 0's manifest; collective."""
    mine = (path.relative_to(it_dir).as_posix(), digest) if digest is not None else None
    everyone: list = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    return dict(entry for entry in everyone if entry is not None)


def _named(iteration: Optional[int | str]) -> str:
    return str(iteration) if iteration is not None else "none"


def _update_tracker(save_dir: Path, iteration: int, previous: Optional[int | str],
                    digests: dict[str, FileDigest]) -> None:
    """Write the iteration's manifest, then point the tracker at it (rank 0, after every rank file is complete);
    collective."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            write_manifest(iteration_dir(save_dir, iteration), iteration, digests)
            atomic_write_text(tracker_path(save_dir), str(iteration))
        except Exception as exc:
            error = exc
    if not _all_ranks_ok(error is None):  # also the barrier
        raise CheckpointWriteError(
            f"saving checkpoint iteration {iteration} to {save_dir}: writing its manifest or the tracker "
            f"{tracker_path(save_dir)} failed"
            f"{f': {error}' if error else ' on rank 0'}. It still names the previous checkpoint "
            f"({_named(previous)}), left intact; iteration {iteration} is complete and "
            f"loadable with --ckpt-step {iteration}.") from error


@dataclass
class PendingSave:
    """One save between its collective snapshot and its finalize: `write` needs no other rank (the async writer
    runs it in a background process), `finalize` publishes it once every rank has written."""

    save_dir: Path
    iteration: int
    previous: Optional[int | str]  # what the tracker named before this save
    created_dir: bool
    path: Path  # this TP rank's file
    payload: Optional[Callable[[], dict]]  # builds what to write; None on ranks that write no file (DP rank > 0)

    def write(self) -> tuple[Optional[FileDigest], Optional[Exception]]:
        """Write this rank's file; returns its digest, or the failure instead of raising, so every rank reaches
        the vote."""
        if self.payload is None:
            return None, None
        try:
            return atomic_save(self.payload(), self.path), None
        except Exception as exc:  # ENOSPC/EIO, but any failure: the other ranks must not hang in the vote
            return None, exc

    def finalize(self, digest: Optional[FileDigest], error: Optional[Exception]) -> Path:
        """Vote on every rank's write, then the manifest and the tracker (or clean up and raise on all ranks);
        collective."""
        it_dir = iteration_dir(self.save_dir, self.iteration)
        if not _all_ranks_ok(error is None):
            if self.created_dir and (not dist.is_initialized() or dist.get_rank() == 0):
                shutil.rmtree(it_dir, ignore_errors=True)
            where = (f"writing {self.path} failed: {error}" if error is not None
                     else "another rank failed to write its file")
            raise CheckpointWriteError(
                f"saving checkpoint iteration {self.iteration} to {self.save_dir}: {where}. The tracker "
                f"{tracker_path(self.save_dir)} still names the previous checkpoint ({_named(self.previous)}), "
                "left intact.") from error
        _update_tracker(self.save_dir, self.iteration, self.previous, _gather_digests(it_dir, self.path, digest))
        logger.info("saved checkpoint iteration %s to %s", self.iteration, self.save_dir)
        return self.path


def _payload(header: dict, model: nn.Module, lora: Optional[dict], training_state: dict, rng: dict) -> dict:
    """The rank file's dict (module docstring), in its key order."""
    return {**header, "model": _model_state(model, lora), **({"lora": lora} if lora is not None else {}),
            **training_state, **rng}


def _snapshot(save_dir: Path, iteration: int, model: nn.Module, optimizer, scheduler, clip, header: dict,
              save_optim: bool, save_rng: bool, lora: Optional[dict], dims: ParallelDims,
              in_writer: bool) -> PendingSave:
    """What the file will hold; collective. With `in_writer` (an async save of host-resident state whose optimizer
    `gathers_locally`) everything but the RNG states is gathered by the forked writer from the memory as it is at
    the fork, so training pauses for no copy; otherwise the payload is built here, as host copies."""
    previous = read_tracker(save_dir)
    created_dir = not iteration_dir(save_dir, iteration).exists()
    if dist.is_initialized():  # everyone has looked at the directory before anyone creates it
        dist.barrier()
    rng = {"rng_state": _gather_rng_states(dims)} if save_rng else {}  # collective
    header = {**header, "parallel": {"tensor_model_parallel_size": dims.tp}}
    writes = dims.dp_cp_rank == 0
    if in_writer:
        payload = (lambda: _payload(header, model, lora, _training_state(model, optimizer, scheduler, clip,
                                                                         save_optim), rng)) if writes else None
    else:
        training_state = _training_state(model, optimizer, scheduler, clip, save_optim)  # collective
        built = _payload(header, model, lora, training_state, rng) if writes else None
        payload = (lambda: built) if writes else None
    return PendingSave(save_dir, int(iteration), previous, created_dir, model_file(save_dir, iteration, dims.tp_rank),
                       payload)


def _gathers_in_writer(model: nn.Module, optimizer) -> bool:
    """Whether an async save can leave the whole snapshot to its forked writer: host-resident weights and an
    optimizer state that needs no other rank to gather."""
    on_host = all(p.device.type == "cpu" for p in unwrap(model).parameters())
    return on_host and (optimizer is None or gathers_locally(optimizer))


def save_checkpoint(save_dir: Path | str, iteration: int, model: nn.Module, optimizer=None, scheduler=None, *,
                    clip=None, consumed_train_samples: int = 0, args: Any = None, save_optim: bool = True,
                    save_rng: bool = True, lora: Optional[dict] = None, dims: Optional[ParallelDims] = None,
                    async_saves: Optional[AsyncSaves] = None) -> Path:
    """Write iteration `iteration`; collective, call on every rank. Returns this TP rank's file path.

    `model` is the (megatron-DDP-wrapped) module, `optimizer` the megatron optimizer from `build_optimizer`,
    `scheduler` its `OptimizerParamScheduler`, `clip` the `AdaptiveGradClip`. `lora` (`lora_metadata` of a
    LoRA run) stores the adapters instead of the whole model, with the metadata. `dims`: the run's layout
    (default: the process groups already built). `async_saves` (`--async-save`): snapshot now, write in the
    background, publish at a later `async_saves.maybe_finalize` (docs/checkpoints.md).
    """
    started = time.monotonic()
    waited = async_saves.wait() if async_saves is not None else 0.0  # at most one save in flight
    header = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": int(iteration),
              "consumed_train_samples": int(consumed_train_samples), "args": _plain(args)}
    pending = _snapshot(Path(save_dir), iteration, model, optimizer, scheduler, clip, header, save_optim, save_rng,
                        lora, dims or ParallelDims.current(),
                        in_writer=async_saves is not None and _gathers_in_writer(model, optimizer))
    if async_saves is not None:
        async_saves.schedule(pending.iteration, local_request(pending.write, pending.finalize),
                             stalled_s=time.monotonic() - started, waited_s=waited)
        return pending.path
    pending.finalize(*pending.write())
    logger.info("checkpoint iteration %s: training paused %.3f s for the save", iteration, time.monotonic() - started)
    return pending.path


def _load_adapters(model: nn.Module, state: dict, path: Path, lora: dict) -> None:
    """A LoRA run loads adapters only, from an adapter checkpoint of the same LoRA config and base config."""
    from ..models.lora import check_resumable, load_lora_state_dict

    if "lora" not in state:
        raise CheckpointError(f"{path}: a full-model checkpoint, not LoRA adapters; give the base with --load "
                              "and resume adapters with --lora-load")
    try:
        check_resumable(state["lora"], lora, str(path))
        load_lora_state_dict(unwrap(model), state["model"], str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def _load_model(model: nn.Module, state_dict: dict, path: Path, strict: bool) -> None:
    try:
        result = unwrap(model).load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: model weights do not fit this model: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(f"{path}: model keys differ from this model: missing {missing[:8]} "
                              f"({len(missing)}), unexpected {result.unexpected_keys[:8]} "
                              f"({len(result.unexpected_keys)})")


def _restore_weights(model: nn.Module, saved: RankFile, strict: bool, lora: Optional[dict]) -> None:
    if lora is not None:
        _load_adapters(model, saved.state, saved.path, lora)
    elif "lora" in saved.state:
        raise CheckpointError(f"{saved.path}: holds LoRA adapters only; resume it with the same --lora-* flags and "
                              "--lora-load, or fold it into its base with convert_mm_to_ckpt.py --lora-merge")
    else:
        _load_model(model, saved.state["model"], saved.path, strict)


def _restore_optimizer(model: nn.Module, optimizer, saved: RankFile) -> None:
    """Optimizer state (and the EMA it carries) as saved; checks the format and that it fits."""
    opt_state = saved.state["optimizer"]
    if opt_state.get("format") != OPTIMIZER_FORMAT:
        raise CheckpointError(f"{saved.path}: optimizer state format {opt_state.get('format')!r} is not "
                              f"{OPTIMIZER_FORMAT!r}; load with no_load_optim=True")
    try:
        load_optimizer_state(unwrap(model), optimizer, opt_state, saved.state.get("ema_model", {}))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{saved.path}: optimizer state does not fit this model/optimizer: {exc}") from exc


class ScheduleMismatchError(UserError):
    """The LR schedule of the flags differs from the checkpoint's and no flag says which one to keep."""


def check_schedule(scheduler, saved: RankFile) -> None:
    """Refuse, before megatron's scheduler asserts on it, a resume whose schedule flags differ from the
    checkpoint's (`--train-iters`, `--lr`, ...), naming each flag and both ways to resolve it."""
    state = saved.state.get("opt_param_scheduler")
    differing = schedule_mismatches(scheduler, state) if scheduler is not None and state else []
    if differing:
        folder = saved.path if saved.path.is_dir() else saved.path.parent.parent
        raise ScheduleMismatchError(
            f"{folder}: the LR schedule of the flags differs from the checkpoint's: {'; '.join(differing)}. Pass "
            "--override-opt_param-scheduler to continue on the flags' schedule, or "
            "--use-checkpoint-opt_param-scheduler to keep the checkpoint's (or resume with the checkpoint's values)")


def _restore_training_state(model: nn.Module, saved: RankFile, optimizer, scheduler, clip, *, fresh_optimizer: bool,
                            load_rng: bool, dp_rank: int) -> None:
    """Optimizer, scheduler and clip state (or a fresh optimizer from the loaded weights), then the RNG states."""
    state = saved.state
    if not fresh_optimizer:
        check_schedule(scheduler, saved)  # before anything is restored
    if optimizer is not None:
        if fresh_optimizer:
            reset_optimizer_state(optimizer)  # main (fp32) params from the loaded weights
        else:
            _restore_optimizer(model, optimizer, saved)
    if not fresh_optimizer:
        if scheduler is not None and "opt_param_scheduler" in state:
            scheduler.load_state_dict(state["opt_param_scheduler"])
        if clip is not None and "clip_state" in state:
            clip.load_state_dict(state["clip_state"])
    if load_rng and "rng_state" in state:
        rng = state["rng_state"]
        set_rng_state(rng[dp_rank] if dp_rank < len(rng) else rng[0])


def _read_on_every_rank(load_dir: Path, iteration: int | str, tp_rank: int, tp_size: int,
                        verify: bool) -> RankFile:
    """This rank's file; if any rank cannot read its own, every rank raises instead of waiting for it."""
    try:
        saved, error = read_rank(load_dir, iteration, tp_rank, tp_size, verify=verify), None
    except CheckpointError as exc:
        saved, error = None, exc
    if not _all_ranks_ok(error is None):
        raise error or CheckpointError(f"{iteration_dir(load_dir, iteration)}: another rank could not read its "
                                       "checkpoint file (its error names the file)")
    return saved


def load_checkpoint(load_dir: Path | str, model: nn.Module, optimizer=None, scheduler=None, *, clip=None,
                    iteration: Optional[int] = None, no_load_optim: bool = False, no_load_rng: bool = False,
                    finetune: bool = False, strict: bool = True, lora: Optional[dict] = None,
                    dims: Optional[ParallelDims] = None, verify: bool = False) -> Optional[LoadedCheckpoint]:
    """Restore what `save_checkpoint` wrote; collective. None when `load_dir` has no tracker (fresh start).

    `lora` (`lora_metadata` of this LoRA run): load adapters, refusing a checkpoint of another LoRA config or
    base config, or a full-model checkpoint. Without it an adapter checkpoint is refused.

    `finetune`: weights only, iteration 0, fresh optimizer (EMA restarts from the weights). `no_load_optim`
    keeps the iteration but starts a fresh optimizer/scheduler/clip state. The trainer must not step the
    scheduler for the restored iteration: its state is restored here. The file's size is checked against the
    iteration's manifest, and with `verify` its checksum too.
    """
    load_dir = Path(load_dir)
    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            logger.warning("no %s in %s: starting from scratch", tracker_path(load_dir).name, load_dir)
            return None
    dims = dims or ParallelDims.current()
    saved = _read_on_every_rank(load_dir, iteration, dims.tp_rank, dims.tp, verify)
    return restore(saved, model, optimizer, scheduler, clip=clip, no_load_optim=no_load_optim, finetune=finetune,
                   load_rng=not (finetune or no_load_rng), strict=strict, lora=lora, dp_rank=dims.dp_cp_rank)


def restore(saved: RankFile, model: nn.Module, optimizer=None, scheduler=None, *, clip=None, no_load_optim: bool,
            finetune: bool, load_rng: bool, strict: bool, lora: Optional[dict], dp_rank: int) -> LoadedCheckpoint:
    """Put a rank's checkpoint content (the legacy file's dict, also what `dist_format` reads) into the run;
    collective (ends with a barrier)."""
    _restore_weights(model, saved, strict, lora)
    _restore_training_state(model, saved, optimizer, scheduler, clip,
                            fresh_optimizer=finetune or no_load_optim or "optimizer" not in saved.state,
                            load_rng=load_rng, dp_rank=dp_rank)
    if dist.is_initialized():
        dist.barrier()
    state = saved.state
    return LoadedCheckpoint(iteration=0 if finetune else int(state["iteration"]),
                            consumed_train_samples=0 if finetune else int(state.get("consumed_train_samples", 0)),
                            args=state.get("args"), path=saved.path)
