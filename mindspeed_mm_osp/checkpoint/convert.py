"""Merge TP-sharded training checkpoints into one weights file, or split weights back into TP shards.

`convert_mm_to_ckpt.py --load_dir CKPT --save_dir OUT [--ema] [--iteration N] [--format safetensors|pt|both]`
writes `OUT/model[_ema].safetensors` and/or `OUT/model[_ema].pt` (flat state dict, the release `model_ema.pt`
layout) plus `OUT/convert_info.json`. `--target-tp N` instead writes `OUT/iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt`
(`model` and `ema_model`) and the tracker, from a training checkpoint or a merged file, to resume, finetune or
infer at another TP size.
`--lora-merge --base BASE` folds the LoRA adapters of the checkpoint in `--load_dir` (their EMA with `--ema`) into
the base weights (a merged/released file or a training checkpoint) and writes the merged weights like above.

Differences from the reference converter (training.md §6.5), on purpose:
* the split rule per key comes from `models.predictor.tp_split_dim` (explicit patterns, not suffixes);
* every rank folder must be present, key sets and shapes must agree across ranks, replicated tensors must be
  equal on every rank (the reference silently kept the last rank's copy); errors name rank, key and file;
* the TP size recorded in each file is checked against the folder count (the reference's check never ran);
* `_extra_state` entries are dropped, outputs are safetensors and/or .pt written atomically after everything has
  been read and validated, so a failure leaves no output file;
* the EMA export is the fp32 EMA our checkpoints carry (the reference exported bf16).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from .checkpointing import CHECKPOINT_VERSION
from .io import atomic_save, atomic_write_text
from .layout import MODEL_FILE, RELEASE, CheckpointError, iteration_dir, read_tracker, tracker_path

logger = logging.getLogger(__name__)

INFO_FILE = "convert_info.json"
FORMATS = ("safetensors", "pt", "both")
_ITER_DIR = re.compile(r"^(iter_\d{7}|release)$")
_MP_DIR = re.compile(r"^mp_rank_(\d{2})$")
_REPLICA_TOL = dict(rtol=0.0, atol=0.0)  # replicas are bit-identical in our training; anything else is a bug


@dataclass(frozen=True)
class MergedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    iteration: int | str
    tp_size: int
    ema: bool
    source: Path


# ------------------------------------------------------------------------------------------------ locating


def locate_iteration(load_dir: Path | str, iteration: Optional[int | str] = None) -> tuple[Path, int | str]:
    """(iteration folder, iteration) for a checkpoint root (tracker or `iteration`) or an `iter_XXXXXXX` folder."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise CheckpointError(f"{load_dir}: checkpoint directory not found")
    if _ITER_DIR.match(load_dir.name) and any(_MP_DIR.match(d.name) for d in load_dir.iterdir()):
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


def rank_files(it_dir: Path) -> list[Path]:
    """`mp_rank_XX/model_optim_rng.pt` for ranks 0..TP-1; any other layout or a missing rank raises."""
    subdirs = [d for d in sorted(it_dir.iterdir()) if d.is_dir()]
    unknown = [d.name for d in subdirs if not _MP_DIR.match(d.name)]
    if unknown:
        raise CheckpointError(f"{it_dir}: unknown checkpoint layout, folders {unknown} are not mp_rank_XX "
                              "(pipeline/expert-parallel checkpoints are not supported)")
    ranks = sorted(int(_MP_DIR.match(d.name).group(1)) for d in subdirs)
    if not ranks:
        raise CheckpointError(f"{it_dir}: no mp_rank_XX folders (incomplete save or not a checkpoint)")
    missing = sorted(set(range(ranks[-1] + 1)) - set(ranks))
    if missing:
        raise CheckpointError(f"{it_dir}: TP rank folder(s) {['mp_rank_%02d' % r for r in missing]} missing "
                              f"(found {['mp_rank_%02d' % r for r in ranks]}); the checkpoint is incomplete")
    files = [it_dir / f"mp_rank_{r:02d}" / MODEL_FILE for r in ranks]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{absent[0]}: checkpoint file missing ({len(absent)} rank(s) without {MODEL_FILE})")
    return files


def _read_rank(path: Path, tp_size: int, iteration: int | str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt file): {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: unknown layout, not a model_optim_rng.pt (no 'model' entry)")
    file_tp = state.get("parallel", {}).get("tensor_model_parallel_size", tp_size)
    if file_tp != tp_size:
        raise CheckpointError(f"{path}: written by a run with tensor-parallel size {file_tp}, but the folder has "
                              f"{tp_size} mp_rank_XX folders")
    file_it = state.get("iteration")
    if iteration != RELEASE and file_it is not None and int(file_it) != int(iteration):
        raise CheckpointError(f"{path}: holds iteration {file_it}, expected {iteration}")
    return state


def _entry(state: dict, key: str, path: Path) -> dict:
    if key not in state:
        raise CheckpointError(f"{path}: no '{key}' entry (was the run trained with the EMA optimizer?); "
                              "drop --ema to export the model weights")
    weights = {k: v for k, v in state[key].items() if not k.endswith("_extra_state")}
    bad = [k for k, v in weights.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: '{key}' has non-tensor entries {bad[:5]}")
    return weights


# ------------------------------------------------------------------------------------------------ merge / split


def merge_shards(shards: Sequence[Mapping[str, torch.Tensor]], names: Optional[Sequence[str]] = None) -> dict:
    """Merged (TP=1 view) state dict from per-rank shards in rank order, after checking they fit together.

    `names` (one per shard, e.g. the file paths) only label errors.
    """
    from ..models.predictor import merge_state_dicts, strip_extra_state, tp_split_dim

    names = list(names) if names is not None else [f"rank {r}" for r in range(len(shards))]
    shards = [strip_extra_state(s) for s in shards]
    base = shards[0]
    for r, shard in enumerate(shards[1:], start=1):
        extra, missing = sorted(set(shard) - set(base)), sorted(set(base) - set(shard))
        if extra or missing:
            key = (extra or missing)[0]
            raise CheckpointError(f"{names[r]}: TP rank {r} key set differs from rank 0 ({names[0]}): "
                                  f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} extra "
                                  f"(e.g. {extra[:3]}); first: {key}")
    for key, ref in base.items():
        dim = tp_split_dim(key)
        if dim is not None and ref.ndim <= dim:
            raise CheckpointError(f"{names[0]}: key {key} of shape {tuple(ref.shape)} has no dim {dim} to merge")
        for r, shard in enumerate(shards[1:], start=1):
            value = shard[key]
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise CheckpointError(f"{names[r]}: key {key} is {tuple(value.shape)} {value.dtype} on TP rank {r} "
                                      f"but {tuple(ref.shape)} {ref.dtype} on rank 0 ({names[0]})")
            if dim is None and not torch.allclose(value.float(), ref.float(), **_REPLICA_TOL):
                diff = (value.float() - ref.float()).abs().max().item()
                raise CheckpointError(f"{names[r]}: replicated key {key} differs between TP rank {r} and rank 0 "
                                      f"({names[0]}) by up to {diff:.3g}; the ranks are out of sync")
    return merge_state_dicts(shards)


def read_checkpoint(load_dir: Path | str, iteration: Optional[int | str] = None
                    ) -> tuple[Path, int | str, list[Path], list[dict]]:
    """(iteration folder, iteration, rank files, rank states) of one iteration (the tracker's by default)."""
    it_dir, it = locate_iteration(load_dir, iteration)
    files = rank_files(it_dir)
    return it_dir, it, files, [_read_rank(path, len(files), it) for path in files]


def merge_checkpoint(load_dir: Path | str, *, ema: bool = False,
                     iteration: Optional[int | str] = None) -> MergedCheckpoint:
    """Read every TP rank of one iteration (the tracker's by default) and merge `model` (or `ema_model`)."""
    it_dir, it, files, states = read_checkpoint(load_dir, iteration)
    return merge_entry(it_dir, it, files, states, "ema_model" if ema else "model")


def merge_entry(it_dir: Path, it: int | str, files: list[Path], states: list[dict], key: str) -> MergedCheckpoint:
    """Merge `key` ("model" or "ema_model") of the rank states returned by `read_checkpoint`."""
    shards = [_entry(state, key, path) for path, state in zip(files, states)]
    merged = merge_shards(shards, [str(f) for f in files])
    return MergedCheckpoint(merged, it, len(files), key == "ema_model", it_dir)


def split_weights(state_dict: Mapping[str, torch.Tensor], tp_size: int) -> list[dict]:
    """Per-rank shards of a merged state dict (rank order), the inverse of `merge_shards`."""
    from ..models.predictor import shard_state_dict, unwrap_state_dict

    if tp_size < 1:
        raise CheckpointError(f"target TP size must be >= 1, got {tp_size}")
    full = unwrap_state_dict(state_dict)
    try:
        return [shard_state_dict(full, r, tp_size) for r in range(tp_size)]
    except ValueError as exc:
        raise CheckpointError(f"cannot split into TP={tp_size}: {exc}") from exc


# ------------------------------------------------------------------------------------------------ writing


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_merged(merged: MergedCheckpoint, save_dir: Path | str, fmt: str = "both") -> list[Path]:
    """Write `model[_ema].{safetensors,pt}` and `convert_info.json` (each atomically); returns the paths."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    save_dir = Path(save_dir)
    stem = "model_ema" if merged.ema else "model"
    info = {"iteration": merged.iteration, "tp_size": merged.tp_size, "ema": merged.ema,
            "source": str(merged.source.resolve()), "num_tensors": len(merged.state_dict),
            "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in merged.state_dict.values()})}
    written = []
    if fmt in ("safetensors", "both"):
        path = save_dir / f"{stem}.safetensors"
        atomic_save_safetensors(merged.state_dict, path, {k: json.dumps(v) for k, v in info.items()})
        written.append(path)
    if fmt in ("pt", "both"):
        path = save_dir / f"{stem}.pt"
        atomic_save(merged.state_dict, path)
        written.append(path)
    info["files"] = [p.name for p in written]
    path = save_dir / INFO_FILE
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")
    return written + [path]


def save_split_checkpoint(model_sd: Mapping[str, torch.Tensor], save_dir: Path | str, tp_size: int,
                          iteration: int | str, ema_sd: Optional[Mapping[str, torch.Tensor]] = None,
                          source: str = "") -> list[Path]:
    """Megatron layout at TP=`tp_size` holding `model` and `ema_model` (= `model` when no EMA is given).

    No optimizer state: `load_checkpoint` then starts a fresh optimizer whose EMA restarts from the weights
    (use it with `--finetune` or `--no-load-optim`). All shards are built before the first file is written.
    """
    model_shards = split_weights(model_sd, tp_size)
    ema_shards = split_weights(ema_sd, tp_size) if ema_sd is not None else model_shards
    paths = []
    for rank, (model, ema) in enumerate(zip(model_shards, ema_shards)):
        payload = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": 0 if iteration == RELEASE else int(iteration),
                   "consumed_train_samples": 0, "args": {"converted_from": source},
                   "parallel": {"tensor_model_parallel_size": tp_size}, "model": model,
                   "ema_model": {k: v.float() for k, v in ema.items()}}
        path = iteration_dir(save_dir, iteration) / f"mp_rank_{rank:02d}" / MODEL_FILE
        atomic_save(payload, path)
        paths.append(path)
    atomic_write_text(tracker_path(save_dir), str(iteration))
    return paths


def load_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Merged or released predictor weights (.safetensors, or a torch file possibly wrapped in
    `ema_state_dict`/`model`/`state_dict`), without `_extra_state` entries."""
    from ..models.predictor import strip_extra_state, unwrap_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: unknown layout, expected a state dict, got {type(state).__name__}")
    state = strip_extra_state(unwrap_state_dict(state))
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad or not state:
        raise CheckpointError(f"{path}: unknown layout, not a flat state dict of tensors "
                              f"({'empty' if not state else f'non-tensor entries {bad[:5]}'})")
    return state


def load_predictor_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Merged predictor state dict (training base weights, inference weights) from a weights file (.pt/.pth/.ckpt/.safetensors, wrapped or flat) or from a training
    checkpoint (root with tracker or one `iter_XXXXXXX` folder, any TP size; its EMA when it has one)."""
    path = Path(path)
    if path.is_dir():
        source = read_checkpoint(path)
        if "lora" in source[3][0]:
            raise CheckpointError(f"{path}: holds LoRA adapters only, not base weights; give the base weights here "
                                  "and the adapters with --lora (inference) or --lora-load (training)")
        key = "ema_model" if all("ema_model" in state for state in source[3]) else "model"
        if key == "model":
            logger.warning("%s has no EMA weights; using the model weights", path)
        return merge_entry(*source, key).state_dict
    if path.name == MODEL_FILE:
        raise CheckpointError(f"{path}: one TP shard of a training checkpoint; pass its checkpoint folder instead")
    return load_weights(path)


def merge_lora_checkpoint(load_dir: Path | str, base: Path | str, *, ema: bool = False,
                          iteration: Optional[int | str] = None) -> MergedCheckpoint:
    """Merged base weights with the adapters (or their EMA) of a LoRA checkpoint folded in (TP=1 view).

    The adapters are merged over their TP ranks first; the base (a weights file, or a training checkpoint root
    whose `model` is used) is checked against the base config the adapters record.
    """
    from ..models.lora import check_base_weights, merge_lora, recorded_config

    it_dir, it, files, states = read_checkpoint(load_dir, iteration)
    if "lora" not in states[0]:
        raise CheckpointError(f"{files[0]}: no 'lora' entry, not a LoRA adapter checkpoint (drop --lora-merge to "
                              "convert a full-model checkpoint)")
    adapters = merge_entry(it_dir, it, files, states, "ema_model" if ema else "model")
    base = Path(base)
    base_sd = load_weights(base) if base.is_file() else merge_checkpoint(base).state_dict
    try:
        check_base_weights(states[0]["lora"], base_sd, str(base))
        merged = merge_lora(base_sd, adapters.state_dict, recorded_config(states[0]["lora"]).scaling)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return MergedCheckpoint(merged, it, len(files), ema, it_dir)


def _merged_file_iteration(path: Path) -> int | str:
    info = path.parent / INFO_FILE
    if info.is_file():
        return json.loads(info.read_text()).get("iteration", RELEASE)
    return RELEASE


# ------------------------------------------------------------------------------------------------ CLI


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load_dir", "--load-dir", required=True,
                   help="checkpoint root (tracker), one iter_XXXXXXX folder, or (with --target-tp) a merged file")
    p.add_argument("--save_dir", "--save-dir", required=True, help="output folder")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (`ema_model`) instead of `model`")
    p.add_argument("--iteration", default=None, help="iteration to convert (default: the tracker's)")
    p.add_argument("--target-tp", type=int, default=None,
                   help="split into this many TP shards in the Megatron layout (model and ema_model both) "
                        "instead of writing merged files")
    p.add_argument("--format", choices=FORMATS, default="both", help="merged file format(s)")
    p.add_argument("--lora-merge", action="store_true",
                   help="--load_dir is a LoRA adapter checkpoint: fold its adapters (with --ema, their EMA) into "
                        "--base and write the merged weights (merged files, or --target-tp shards)")
    p.add_argument("--base", default=None,
                   help="with --lora-merge: the base weights (merged/released file or training checkpoint root)")
    args = p.parse_args(argv)
    if args.iteration is not None and args.iteration != RELEASE:
        args.iteration = int(args.iteration)
    if args.lora_merge != (args.base is not None):
        p.error("--lora-merge and --base go together (adapters from --load_dir, base weights from --base)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    load = Path(args.load_dir)
    try:
        if args.lora_merge:
            merged = merge_lora_checkpoint(load, args.base, ema=args.ema, iteration=args.iteration)
            paths = (save_merged(merged, args.save_dir, args.format) if args.target_tp is None else
                     save_split_checkpoint(merged.state_dict, args.save_dir, args.target_tp, merged.iteration,
                                           source=f"{merged.source} + {args.base}"))
        elif args.target_tp is not None:
            if load.is_file():
                weights = load_weights(load)
                it = args.iteration if args.iteration is not None else _merged_file_iteration(load)
                paths = save_split_checkpoint(weights, args.save_dir, args.target_tp, it, source=str(load))
            else:
                source = read_checkpoint(load, args.iteration)
                model = merge_entry(*source, "model")
                # Without an EMA in the source, the EMA restarts from the weights.
                ema_sd = merge_entry(*source, "ema_model").state_dict if "ema_model" in source[3][0] else None
                paths = save_split_checkpoint(model.state_dict, args.save_dir, args.target_tp, model.iteration,
                                              ema_sd, source=str(model.source))
        else:
            merged = merge_checkpoint(load, ema=args.ema, iteration=args.iteration)
            paths = save_merged(merged, args.save_dir, args.format)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    except OSError as exc:  # disk full, permissions: every file is written atomically, so none is half-written
        raise SystemExit(f"error: writing to {args.save_dir} failed: {exc}. Files already there are complete; "
                         f"free space or fix permissions and rerun (the conversion is idempotent).") from None
    for path in paths:
        print(path)


__all__ = ["MergedCheckpoint", "atomic_save_safetensors", "load_predictor_weights", "load_weights", "locate_iteration", "main",
           "merge_checkpoint", "merge_entry", "merge_lora_checkpoint", "merge_shards", "rank_files", "read_checkpoint",
           "save_merged", "save_split_checkpoint", "split_weights"]
