"""Merge TP-sharded training checkpoints into one weights file, or split weights back into TP shards.

`convert_mm_to_ckpt.py --load_dir CKPT --save_dir OUT [--ema] [--iteration N] [--format safetensors|pt|both]`
writes `OUT/model[_ema].safetensors` and/or `OUT/model[_ema].pt` (flat state dict, the release `model_ema.pt`
layout) plus `OUT/convert_info.json`. `--target-tp N` instead writes `OUT/iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt`
(`model` and `ema_model`) and the tracker, from a training checkpoint or a merged file, to resume, finetune or
infer at another TP size.
`--lora-merge --base BASE` folds the LoRA adapters of the checkpoint in `--load_dir` (their EMA with `--ema`) into
the base weights (a merged/released file or a training checkpoint) and writes the merged weights like above.
`--ckpt-format legacy|torch_dist` converts a training checkpoint of either format into that format with all its
state (optimizer, EMA, schedule, RNG): legacy at the saved TP size (or `--target-tp`), torch_dist at none.
Every input may be of either format (`full_state` reads both as one whole, TP=1 view).

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
from . import dist_format
from .checkpointing import CHECKPOINT_VERSION
from .io import atomic_save
from .layout import (CKPT_FORMATS, ITER_DIR, RELEASE, CheckpointError, is_dist_iteration, iteration_dir, model_file,
                     tracker_path)
from .manifest import tensors_checksum, write_manifest
from .reader import TENSORS_CHECKSUM_KEY, SavedCheckpoint, load_weights, locate_iteration, read_checkpoint
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
    """Merged `model` (or `ema_model`) of one iteration (the tracker's by default) of either format; `verify`:
    check the files' checksums against the manifest."""
    return full_state(load_dir, iteration, verify, weights_only=True).merged("ema_model" if ema else "model")


@dataclass(frozen=True)
class FullCheckpoint:
    """A training checkpoint of either format as one whole (TP=1 view): the legacy file's dict with every tensor
    merged over the TP ranks and `rng_state` as one list (over DP x CP ranks) per saved TP rank."""

    state: dict
    directory: Path  # the iteration folder
    iteration: int | str
    tp_size: int

    def merged(self, key: str) -> MergedCheckpoint:
        """`key` ("model" or "ema_model") as merged weights."""
        if key not in self.state:
            raise CheckpointError(f"{self.directory}: no '{key}' entry (was the run trained with the EMA optimizer?); "
                                  "drop --ema to export the model weights")
        return MergedCheckpoint(self.state[key], self.iteration, self.tp_size, key == "ema_model", self.directory)


def _merge_optimizer(saved: Sequence[Mapping], names: Sequence[str]) -> dict:
    """Model-space optimizer states of the TP ranks as one (each tensor field merged like the weights)."""
    fields = sorted({f for entry in saved[0]["state"].values() for f in entry if f != "step"})
    merged = {f: merge_shards([{n: e[f] for n, e in opt["state"].items() if f in e} for opt in saved], names)
              for f in fields}
    state = {name: {"step": entry["step"], **{f: merged[f][name] for f in fields if name in merged[f]}}
             for name, entry in saved[0]["state"].items()}
    return {"format": saved[0]["format"], "param_groups": saved[0]["param_groups"], "state": state}


def _legacy_full(source: SavedCheckpoint, weights_only: bool) -> FullCheckpoint:
    names = [str(f) for f in source.files]
    first = source.ranks[0].state
    state = {k: v for k, v in first.items() if k not in ("model", "ema_model", "optimizer", "rng_state")}
    state["model"] = merge_entry(source, "model").state_dict
    if source.has("ema_model"):
        state["ema_model"] = merge_entry(source, "ema_model").state_dict
    if weights_only:
        return FullCheckpoint(state, source.directory, source.iteration, source.tp_size)
    if source.has("optimizer"):
        state["optimizer"] = _merge_optimizer([rank.state["optimizer"] for rank in source.ranks], names)
    if source.has("rng_state"):
        state["rng_state"] = [rank.state["rng_state"] for rank in source.ranks]
    return FullCheckpoint(state, source.directory, source.iteration, source.tp_size)


def _locate(load_dir: Path | str, iteration: Optional[int | str]) -> tuple[Path, int | str]:
    """`reader.locate_iteration`, also for a torch_dist `iter_XXXXXXX` folder given directly."""
    load_dir = Path(load_dir)
    if ITER_DIR.match(load_dir.name) and is_dist_iteration(load_dir):
        found = RELEASE if load_dir.name == RELEASE else int(load_dir.name[len("iter_"):])
        if iteration is not None and str(iteration) != str(found):
            raise CheckpointError(f"{load_dir}: is iteration {found}, but --iteration {iteration} was asked")
        return load_dir, found
    return locate_iteration(load_dir, iteration)


def full_state(load_dir: Path | str, iteration: Optional[int | str] = None, verify: bool = False,
               weights_only: bool = False) -> FullCheckpoint:
    """One iteration (the tracker's by default) of a legacy or torch_dist checkpoint, as one whole; with
    `weights_only`, `model` and `ema_model` without the optimizer state and RNG states (merges, weights)."""
    it_dir, found = _locate(load_dir, iteration)
    if not is_dist_iteration(it_dir):
        return _legacy_full(read_checkpoint(it_dir.parent, found, verify), weights_only)
    tensors, common = dist_format.read_full(it_dir, verify, ("model", "ema_model") if weights_only else
                                            dist_format.SECTIONS)
    if weights_only:
        common = {k: v for k, v in common.items() if k not in ("optimizer", "rng_state")}
    state = dist_format.join_payload(tensors, common)
    return FullCheckpoint(state, it_dir, found, int(common.get("parallel", {}).get("tensor_model_parallel_size", 1)))


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


def _write_legacy(payloads: Sequence[dict], save_dir: Path | str, iteration: int | str) -> list[Path]:
    """Rank files of a legacy iteration (payloads in TP rank order, all built before this is called), then the
    manifest, then the tracker."""
    paths, digests = [], {}
    for rank, payload in enumerate(payloads):
        path = model_file(save_dir, iteration, rank)
        digests[path.relative_to(iteration_dir(save_dir, iteration)).as_posix()] = atomic_save(payload, path)
        paths.append(path)
    write_manifest(iteration_dir(save_dir, iteration), iteration, digests)
    atomic_write_text(tracker_path(save_dir), str(iteration))
    return paths


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
    payloads = [{"checkpoint_version": CHECKPOINT_VERSION,
                 "iteration": 0 if iteration == RELEASE else int(iteration), "consumed_train_samples": 0,
                 "args": {"converted_from": source}, "parallel": {"tensor_model_parallel_size": tp_size},
                 "model": model, "ema_model": {k: v.float() for k, v in ema.items()}}
                for model, ema in zip(model_shards, ema_shards)]
    return _write_legacy(payloads, save_dir, iteration)


def _split_optimizer(optimizer: Mapping, tp_size: int) -> list[dict]:
    """The TP ranks' model-space optimizer states of a merged one (the inverse of `_merge_optimizer`)."""
    fields = sorted({f for entry in optimizer["state"].values() for f in entry if f != "step"})
    split = {f: split_weights({n: e[f] for n, e in optimizer["state"].items() if f in e}, tp_size) for f in fields}
    return [{"format": optimizer["format"], "param_groups": optimizer["param_groups"],
             "state": {name: {"step": entry["step"], **{f: split[f][rank][name] for f in fields if name in split[f][rank]}}
                       for name, entry in optimizer["state"].items()}}
            for rank in range(tp_size)]


def save_legacy_checkpoint(full: FullCheckpoint, save_dir: Path | str, tp_size: Optional[int] = None) -> list[Path]:
    """`full` in the legacy layout at TP=`tp_size` (default: its own), with all its state. The per-rank RNG
    states are kept only at the saved TP size (at another one they do not map onto the ranks)."""
    tp_size = tp_size or full.tp_size
    state = full.state
    common = {k: v for k, v in state.items() if k not in ("model", "ema_model", "optimizer", "rng_state", "format")}
    sections = {key: split_weights(state[key], tp_size) for key in ("model", "ema_model") if key in state}
    if "optimizer" in state:
        sections["optimizer"] = _split_optimizer(state["optimizer"], tp_size)
    rng = state.get("rng_state")
    if rng is not None and len(rng) == tp_size:
        sections["rng_state"] = rng
    payloads = [{**common, "parallel": {"tensor_model_parallel_size": tp_size},
                 **{key: parts[rank] for key, parts in sections.items()}} for rank in range(tp_size)]
    return _write_legacy(payloads, save_dir, full.iteration)


def save_dist_checkpoint(full: FullCheckpoint, save_dir: Path | str) -> list[Path]:
    """`full` in the torch_dist format, with all its state; returns its files."""
    tensors, common = dist_format.split_payload(full.state)
    common.setdefault("parallel", {"tensor_model_parallel_size": full.tp_size})
    if "rng_state" in full.state:
        common["rng_state"] = full.state["rng_state"]
    it_dir = dist_format.write_full(save_dir, full.iteration, tensors, common)
    return sorted(p for p in it_dir.iterdir() if p.is_file()) + [tracker_path(save_dir)]


def merge_lora_checkpoint(load_dir: Path | str, base: Path | str, *, ema: bool = False,
                          iteration: Optional[int | str] = None, verify: bool = False) -> MergedCheckpoint:
    """Merged base weights with the adapters (or their EMA) of a LoRA checkpoint folded in (TP=1 view).

    The adapters are merged over their TP ranks first; the base (a weights file, or a training checkpoint root
    whose `model` is used) is checked against the base config the adapters record.
    """
    from ..models.lora import check_base_weights, merge_lora, recorded_config

    source = full_state(load_dir, iteration, verify, weights_only=True)
    lora = source.state.get("lora")
    if lora is None:
        raise CheckpointError(f"{source.directory}: no 'lora' entry, not a LoRA adapter checkpoint (drop --lora-merge "
                              "to convert a full-model checkpoint)")
    adapters = source.merged("ema_model" if ema else "model")
    base = Path(base)
    base_sd = load_weights(base, verify) if base.is_file() else merge_checkpoint(base, verify=verify).state_dict
    try:
        check_base_weights(lora, base_sd, str(base))
        merged = merge_lora(base_sd, adapters.state_dict, recorded_config(lora).scaling)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return MergedCheckpoint(merged, source.iteration, source.tp_size, ema, source.directory, lora.get("distill"))


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
    p.add_argument("--ckpt-format", choices=CKPT_FORMATS, default=None,
                   help="write a training checkpoint in this format, with its optimizer, EMA, schedule and RNG "
                        "state, instead of merged files: legacy (at the saved TP size or --target-tp) or torch_dist")
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
    if args.ckpt_format is not None and args.lora_merge:
        p.error("--ckpt-format converts a training checkpoint; --lora-merge writes merged weights: use one")
    if args.ckpt_format == "torch_dist" and args.target_tp is not None:
        p.error("--target-tp does not apply to --ckpt-format torch_dist (it resumes at any TP size)")
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
    if args.ckpt_format is not None:
        if load.is_file():
            raise CheckpointError(f"{load}: a weights file; --ckpt-format converts a training checkpoint folder")
        full = full_state(load, args.iteration, verify)
        if args.ckpt_format == "torch_dist":
            return save_dist_checkpoint(full, args.save_dir)
        return save_legacy_checkpoint(full, args.save_dir, args.target_tp)
    if args.target_tp is None:
        merged = merge_checkpoint(load, ema=args.ema, iteration=args.iteration, verify=verify)
        return save_merged(merged, args.save_dir, args.format)
    if load.is_file():
        it = args.iteration if args.iteration is not None else _merged_file_iteration(load)
        return save_split_checkpoint(load_weights(load, verify), args.save_dir, args.target_tp, it, source=str(load))
    full = full_state(load, args.iteration, verify, weights_only=True)
    # Without an EMA in the source, the EMA restarts from the weights.
    return save_split_checkpoint(full.state["model"], args.save_dir, args.target_tp, full.iteration,
                                 full.state.get("ema_model"), source=str(full.directory))


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


__all__ = ["FullCheckpoint", "MergedCheckpoint", "cli", "full_state", "main", "merge_checkpoint", "merge_entry",
           "merge_lora_checkpoint", "merge_shards", "save_dist_checkpoint", "save_legacy_checkpoint", "save_merged",
           "save_split_checkpoint", "split_weights"]
