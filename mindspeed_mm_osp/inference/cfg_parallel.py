"""CFG-parallel sampling: the unconditional and the conditional branch on two rank groups.

For inference the data-parallel dimension of megatron's layout is free, so CFG-parallel reuses it: megatron's
DP groups (each rank with the same TP/CP coordinates) are cut into consecutive pairs; DP rank 2k runs the
unconditional half of every step, DP rank 2k+1 the conditional half, each on its own TP (and CP) group, and the
pair all-gathers the two predictions once per step. Both ranks then hold the same [uncond; cond] prediction the
batched forward would have produced, so guidance, rescale and the Euler step run unchanged
(`diffusion.sample`) and the latents are identical on both sides and to the batched path up to the
per-batch-size float reassociation of the model (1e-5). Prompts are split over the DP/2 pairs (replicas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..parallel import ParallelConfigError, ParallelDims

ModelFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class CfgParallelGroup:
    """This rank's CFG pair: `branch` 0 = unconditional, 1 = conditional; `replica` indexes the pairs."""

    group: dist.ProcessGroup
    branch: int
    replica: int
    num_replicas: int


def group_by(key) -> dist.ProcessGroup:
    """The process group of the ranks whose `key` equals this rank's (collective: every rank calls it with a
    key; groups are created for every distinct key, in sorted order, as torch.distributed requires)."""
    keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    mine = None
    for k in sorted(set(keys)):
        group = dist.new_group([r for r, other in enumerate(keys) if other == k])
        if k == key:
            mine = group
    return mine


def init_cfg_parallel(dims: ParallelDims) -> CfgParallelGroup:
    """Pairs of consecutive DP ranks of `dims` (collective: every rank must call it once, after megatron's groups)."""
    if dims.dp % 2:
        raise ParallelConfigError(f"--cfg-parallel needs an even data-parallel size (world size / TP = "
                                  f"{dims.world_size} / {dims.tp} = {dims.dp}); launch 2 x TP x n ranks")
    dp_group = tuple(dist.get_process_group_ranks(dims.dp_group))
    return CfgParallelGroup(group_by((dp_group, dims.dp_rank // 2)), dims.dp_rank % 2, dims.dp_rank // 2, dims.dp // 2)


def describe_pairs(cfg: CfgParallelGroup) -> str:
    """Every pair's global ranks, in words for the run's log (collective: every rank must call it)."""
    me = dist.get_rank()
    peer = next(r for r in dist.get_process_group_ranks(cfg.group) if r != me)
    entries: list = [None] * dist.get_world_size()
    dist.all_gather_object(entries, (cfg.replica, cfg.branch, me, peer))
    pairs = sorted((replica, me, peer) for replica, branch, me, peer in entries if branch == 0)
    listed = ", ".join(f"uncond rank {u} + cond rank {c} (replica {replica})" for replica, u, c in pairs)
    return (f"{len(pairs)} pair(s): {listed}; each step all-gathers the two halves; prompts split over "
            f"{cfg.num_replicas} replica(s)")


def cfg_parallel_model_fn(model_fn: ModelFn, cfg: CfgParallelGroup) -> ModelFn:
    """Wrap a `model_fn` that the sampler calls with the batched [uncond; cond] inputs: run only this rank's
    half and return the pair's all-gathered [uncond; cond] prediction."""

    def run_half(x: torch.Tensor, timestep: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"CFG-parallel expects the batched [uncond; cond] input, got batch {x.shape[0]}")
        half = slice(cfg.branch * (x.shape[0] // 2), (cfg.branch + 1) * (x.shape[0] // 2))
        v = model_fn(x[half], timestep[half], **{k: t[half] for k, t in cond.items()}).contiguous()
        parts = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(parts, v, group=cfg.group)
        return torch.cat(parts)

    return run_half


__all__ = ["CfgParallelGroup", "cfg_parallel_model_fn", "describe_pairs", "group_by", "init_cfg_parallel"]
