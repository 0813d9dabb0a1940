"""Merge TP-sharded training checkpoints into one weights file, or split weights back into TP shards.

`convert_mm_to_ckpt.py --load_dir CKPT --save_dir OUT [--ema] [--iteration N] [--format safetensors|pt|both]`
writes `OUT/model[_ema].safetensors` and/or `OUT/model[_ema].pt` (flat state dict, the release `model_ema.pt`
layout) plus `OUT/convert_info.json`. `--target-tp N` instead writes `OUT/iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt`
(`model` and `ema_model`) and the tracker, from a training checkpoint or a merged file, to resume, finetune or
infer at another TP size.
`--lora-merge --base BASE` folds the LoRA adapters of the checkpoint in `--load_dir` (their EMA with `--ema`) into
the base weights (a merged/released file or a training checkpoint) and writes the merged weights like above.

Checkpoints are read by `reader` (which checks each rank file against its folder); this module merges, splits
and writes. Differences from the reference converter (docs/checkpoints.md), on purpose:
* the split rule per key comes from `models.predictor.tp_split_dim` (explicit patterns, not suffixes);
* every rank folder must be present, key sets and shapes must agree across ranks, replicated tensors must be
  equal on every rank (the reference silently kept the last rank's copy); errors name rank, key and file;
* the TP size recorded in each file is checked against the folder count (`reader`; the reference's check never
  ran);
* `_extra_state` entries are dropped, outputs are safetensors and/or .pt written atomically after everything has
  been read and validated, so a failure leaves no output file;
* the EMA export is the fp32 EMA our checkpoints carry (the reference exported bf16).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..errors import entry_point
from ..io_atomic import atomic_save_safetensors, atomic_write_text
from .checkpointing import CHECKPOINT_VERSION
from .io import atomic_save
from .layout import RELEASE, CheckpointError, iteration_dir, model_file, tracker_path
from .manifest import tensors_checksum, write_manifest
from .reader import TENSORS_CHECKSUM_KEY, SavedCheckpoint, load_weights, read_checkpoint
from .safe_load import trust_pickle

INFO_FILE = "convert_info.json"
FORMATS = ("safetensors", "pt", "both")
_REPLICA_TOL = dict(rtol=0.0, atol=0.0)  # replicas are bit-identical in our training; anything else is a bug


@dataclass(frozen=True)
class MergedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    iteration: int | str
    tp_size: int
    ema: bool
    source: Path
    student: Optional[dict] = None  # a distilled student's schedule (`diffusion.student`), recorded in the outputs


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


def merge_checkpoint(load_dir: Path | str, *, ema: bool = False, iteration: Optional[int | str] = None,
                     verify: bool = False) -> MergedCheckpoint:
    """Read every TP rank of one iteration (the tracker's by default) and merge `model` (or `ema_model`);
    `verify`: check the files' checksums against the manifest."""
    return merge_entry(read_checkpoint(load_dir, iteration, verify), "ema_model" if ema else "model")


def merge_entry(source: SavedCheckpoint, key: str) -> MergedCheckpoint:
    """Merge `key` ("model" or "ema_model") over the TP ranks of `source`."""
    merged = merge_shards([rank.weights(key) for rank in source.ranks], [str(f) for f in source.files])
    return MergedCheckpoint(merged, source.iteration, source.tp_size, key == "ema_model", source.directory)


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


def save_merged(merged: MergedCheckpoint, save_dir: Path | str, fmt: str = "both") -> list[Path]:
    """Write `model[_ema].{safetensors,pt}` and `convert_info.json` (each atomically); returns the paths. The
    safetensors metadata carries the tensors' checksum (`load_weights(verify=True)` checks it); both it and the json
    carry a distilled student's schedule (`student`), which `inference.py` samples on."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    save_dir = Path(save_dir)
    stem = "model_ema" if merged.ema else "model"
    info = {"iteration": merged.iteration, "tp_size": merged.tp_size, "ema": merged.ema,
            "source": str(merged.source.resolve()), "num_tensors": len(merged.state_dict),
            "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in merged.state_dict.values()})}
    if merged.student is not None:
        info["student"] = merged.student
    written = []
    if fmt in ("safetensors", "both"):
        path = save_dir / f"{stem}.safetensors"
        metadata = {k: json.dumps(v) for k, v in info.items()}
        metadata[TENSORS_CHECKSUM_KEY] = tensors_checksum(merged.state_dict)
        atomic_save_safetensors(merged.state_dict, path, metadata)
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
    (use it with `--finetune` or `--no-load-optim`). All shards are built before the first file is written; the
    manifest is written after the last one, the tracker after the manifest.
    """
    model_shards = split_weights(model_sd, tp_size)
    ema_shards = split_weights(ema_sd, tp_size) if ema_sd is not None else model_shards
    paths, digests = [], {}
    for rank, (model, ema) in enumerate(zip(model_shards, ema_shards)):
        payload = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": 0 if iteration == RELEASE else int(iteration),
                   "consumed_train_samples": 0, "args": {"converted_from": source},
                   "parallel": {"tensor_model_parallel_size": tp_size}, "model": model,
                   "ema_model": {k: v.float() for k, v in ema.items()}}
        path = model_file(save_dir, iteration, rank)
        digests[path.relative_to(iteration_dir(save_dir, iteration)).as_posix()] = atomic_save(payload, path)
        paths.append(path)
    write_manifest(iteration_dir(save_dir, iteration), iteration, digests)
    atomic_write_text(tracker_path(save_dir), str(iteration))
    return paths


def merge_lora_checkpoint(load_dir: Path | str, base: Path | str, *, ema: bool = False,
                          iteration: Optional[int | str] = None, verify: bool = False) -> MergedCheckpoint:
    """Merged base weights with the adapters (or their EMA) of a LoRA checkpoint folded in (TP=1 view).

    The adapters are merged over their TP ranks first; the base (a weights file, or a training checkpoint root
    whose `model` is used) is checked against the base config the adapters record.
    """
    from ..models.lora import check_base_weights, merge_lora, recorded_config

    source = read_checkpoint(load_dir, iteration, verify)
    if source.lora is None:
        raise CheckpointError(f"{source.files[0]}: no 'lora' entry, not a LoRA adapter checkpoint (drop --lora-merge "
                              "to convert a full-model checkpoint)")
    adapters = merge_entry(source, "ema_model" if ema else "model")
    base = Path(base)
    base_sd = load_weights(base, verify) if base.is_file() else merge_checkpoint(base, verify=verify).state_dict
    try:
        check_base_weights(source.lora, base_sd, str(base))
        merged = merge_lora(base_sd, adapters.state_dict, recorded_config(source.lora).scaling)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return MergedCheckpoint(merged, source.iteration, source.tp_size, ema, source.directory,
                            source.lora.get("distill"))


def _merged_file_iteration(path: Path) -> int | str:
    info = path.parent / INFO_FILE
    if info.is_file():
        try:
            return json.loads(info.read_text(encoding="utf-8")).get("iteration", RELEASE)
        except (ValueError, AttributeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CheckpointError(f"{info}: unreadable ({exc}); pass --iteration or remove the file") from exc
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
    p.add_argument("--verify-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="compare every file's checksum with its iteration's manifest (sizes are always compared)")
    p.add_argument("--trust-pickle", action="append", default=[], metavar="FILE",
                   help="unpickle this one file in full although it needs globals outside the allow-list "
                        "(it can run code; docs/security.md); repeatable")
    args = p.parse_args(argv)
    if args.iteration is not None and args.iteration != RELEASE:
        if not args.iteration.isdigit():
            p.error(f"--iteration must be an iteration number >= 0 or '{RELEASE}', got {args.iteration!r}")
        args.iteration = int(args.iteration)
    if args.target_tp is not None and not 1 <= args.target_tp <= 1024:
        p.error(f"--target-tp must be in [1, 1024], got {args.target_tp}")
    if args.lora_merge != (args.base is not None):
        p.error("--lora-merge and --base go together (adapters from --load_dir, base weights from --base)")
    return args


def _convert(args: argparse.Namespace) -> list[Path]:
    """Run the conversion the flags ask for; returns the paths written."""
    load, verify = Path(args.load_dir), args.verify_checkpoint
    if args.lora_merge:
        merged = merge_lora_checkpoint(load, args.base, ema=args.ema, iteration=args.iteration, verify=verify)
        if args.target_tp is None:
            return save_merged(merged, args.save_dir, args.format)
        return save_split_checkpoint(merged.state_dict, args.save_dir, args.target_tp, merged.iteration,
                                     source=f"{merged.source} + {args.base}")
    if args.target_tp is None:
        merged = merge_checkpoint(load, ema=args.ema, iteration=args.iteration, verify=verify)
        return save_merged(merged, args.save_dir, args.format)
    if load.is_file():
        it = args.iteration if args.iteration is not None else _merged_file_iteration(load)
        return save_split_checkpoint(load_weights(load, verify), args.save_dir, args.target_tp, it, source=str(load))
    source = read_checkpoint(load, args.iteration, verify)
    model = merge_entry(source, "model")
    # Without an EMA in the source, the EMA restarts from the weights.
    ema_sd = merge_entry(source, "ema_model").state_dict if "ema_model" in source.ranks[0].state else None
    return save_split_checkpoint(model.state_dict, args.save_dir, args.target_tp, model.iteration, ema_sd,
                                 source=str(model.source))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Convert; a refused or broken input raises SystemExit("error: ...") naming the file (see `cli`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    try:
        trust_pickle(args.trust_pickle)
        paths = _convert(args)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    except OSError as exc:  # disk full, permissions: every file is written atomically, so none is half-written
        raise SystemExit(f"error: writing to {args.save_dir} failed: {exc}. Files already there are complete; "
                         f"free space or fix permissions and rerun (the conversion is idempotent).") from None
    for path in paths:
        print(path)


@entry_point("convert_mm_to_ckpt.py")
def cli(argv: Optional[Sequence[str]] = None) -> None:
    """`convert_mm_to_ckpt.py` / `osp-convert`: an error is one line on stderr and exit status 2, as the other
    entry points (a SystemExit carrying a message would exit 1); a bug keeps its traceback (`errors.entry_point`)."""
    try:
        main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"convert_mm_to_ckpt.py: {exc.code}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


__all__ = ["MergedCheckpoint", "cli", "main", "merge_checkpoint", "merge_entry", "merge_lora_checkpoint",
           "merge_shards", "save_merged", "save_split_checkpoint", "split_weights"]
