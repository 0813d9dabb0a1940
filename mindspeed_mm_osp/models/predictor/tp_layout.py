"""Tensor-parallel layout of SparseUMMDiT state dicts: the one place that knows which key splits how.

Used by `load_merged_state_dict` (slice a merged/released checkpoint for this rank) and by the checkpoint converter
(merge per-rank shards back). Rules (docs/model.md, "Tensor, sequence and context parallelism"): the reference
converter's lists minus their non-existent keys (docs/reference_bugs.md, `converter-lists-unknown-keys`):

* dim 0 (column-parallel, output features; contiguous heads per rank): attn1 q/k/v and add_q/k/v projections
  (weight and bias), FFN `net.0.proj.weight`, adaLN `norm1.linear`/`norm2.linear`/`norm_out.linear` (weight and bias);
* dim 1 (row-parallel, input features): `attn1.to_out.0.weight`, `attn1.to_add_out.weight`, FFN `net.2.weight`;
* everything else is replicated (norms, row-parallel biases, embedders, skip linears, proj_out).

LoRA adapters `<module>.lora_A` (r x in) / `<module>.lora_B` (out x r) follow their base weight `<module>.weight`:
of a dim-0 (column) weight B splits along dim 0 and A is replicated; of a dim-1 (row) weight A splits along dim 1
and B is replicated (`models.lora`).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import torch

_DIM0 = re.compile(
    r"(^|\.)attn1\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.(weight|bias)$"
    r"|(^|\.)(ff|ff_enc)\.net\.0\.proj\.weight$"
    r"|(^|\.)(norm1|norm2|norm_out)\.linear\.(weight|bias)$")
_DIM1 = re.compile(r"(^|\.)attn1\.(to_out\.0|to_add_out)\.weight$|(^|\.)(ff|ff_enc)\.net\.2\.weight$")
ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])$")
_WRAPPERS = ("ema_state_dict", "model", "state_dict")


def tp_split_dim(key: str) -> Optional[int]:
    """None (replicated), 0 or 1: the dim along which `key` is split over TP ranks."""
    lora = ADAPTER_KEY.match(key)
    if lora:
        base_dim = tp_split_dim(lora.group("module") + ".weight")
        return {(0, "B"): 0, (1, "A"): 1}.get((base_dim, lora.group("which")))
    if _DIM0.search(key):
        return 0
    if _DIM1.search(key):
        return 1
    return None


def strip_extra_state(sd: Mapping[str, object]) -> dict:
    """Drop megatron's `*._extra_state` entries (None-valued TE-compat placeholders in reference checkpoints)."""
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def unwrap_state_dict(sd: Mapping) -> dict:
    """Unwrap `ema_state_dict`/`model`/`state_dict` containers (release files and training checkpoints)."""
    for key in _WRAPPERS:
        if key in sd and isinstance(sd[key], Mapping):
            return unwrap_state_dict(sd[key])
    return dict(sd)


def tp_slice(key: str, shape: Sequence[int], tp_rank: int, tp_size: int) -> Optional[tuple[int, int, int]]:
    """(dim, start, length) of rank `tp_rank`'s piece of `key` (`torch.chunk(tp)[rank]`, as the reference); None
    when the rank keeps the whole tensor."""
    dim = tp_split_dim(key)
    if dim is None or tp_size == 1:
        return None
    if shape[dim] % tp_size:
        raise ValueError(f"{key}: dim {dim} of shape {tuple(shape)} is not divisible by TP={tp_size}")
    length = shape[dim] // tp_size
    return dim, tp_rank * length, length


def shard_state_dict(full_sd: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict:
    """This rank's slice of a merged (TP=1 view) state dict."""
    out = {}
    for key, value in strip_extra_state(full_sd).items():
        piece = tp_slice(key, value.shape, tp_rank, tp_size)
        out[key] = value if piece is None else value.narrow(*piece).clone()
    return out


def merge_state_dicts(shards: Sequence[Mapping[str, torch.Tensor]]) -> dict:
    """Merged TP=1 state dict from the per-rank state dicts in rank order (replicated keys from rank 0)."""
    shards = [strip_extra_state(s) for s in shards]
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], start=1):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise ValueError(f"TP rank {r} has a different key set than rank 0; differing keys: {diff[:20]}")
    out = {}
    for key in keys:
        dim = tp_split_dim(key)
        out[key] = shards[0][key] if dim is None or len(shards) == 1 else torch.cat([s[key] for s in shards], dim)
    return out


__all__ = ["ADAPTER_KEY", "merge_state_dicts", "shard_state_dict", "strip_extra_state", "tp_slice", "tp_split_dim",
           "unwrap_state_dict"]
