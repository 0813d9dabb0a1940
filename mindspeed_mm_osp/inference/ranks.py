"""Where an inference rank sits (replica, writer, decoder) and the one function that sets up its process groups.

A *replica* runs the whole pipeline for its share of the prompts: one TP x CP group, or with `--cfg-parallel` the
two groups of a CFG pair. Only the first rank of a replica (of its unconditional branch) writes files.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..parallel import ParallelDims
from .cfg_parallel import CfgParallelGroup, group_by, init_cfg_parallel


@dataclass(frozen=True)
class Ranks:
    """This rank's place: `dims` the TP x CP x DP layout, `cfg` its CFG pair under `--cfg-parallel`;
    `decode_group` (parallel VAE decode) holds every rank of the replica, and without it only the writer decodes."""

    dims: ParallelDims = field(default_factory=ParallelDims.single)
    cfg: Optional[CfgParallelGroup] = None
    decode_group: Optional[torch.distributed.ProcessGroup] = None

    @property
    def replica(self) -> int:
        return self.dims.dp_rank if self.cfg is None else self.cfg.replica

    @property
    def num_replicas(self) -> int:
        return self.dims.dp if self.cfg is None else self.cfg.num_replicas

    @property
    def writer(self) -> bool:
        """TP rank 0 / CP rank 0 of the (unconditional branch of the) replica: the one rank that writes its files."""
        return self.dims.tp_rank == 0 and self.dims.cp_rank == 0 and (self.cfg is None or self.cfg.branch == 0)

    @property
    def decodes(self) -> bool:
        return self.writer or self.decode_group is not None


def init_parallel(tp: int, cp: int, seed: int, cfg_parallel: bool = False,
                  parallel_vae_decode: bool = False) -> tuple[Ranks, bool]:
    """(ranks, whether we initialised torch.distributed). Single process without TP/CP needs no process group."""
    import torch.distributed as dist

    from ..parallel import ParallelConfigError, initialize_distributed

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1 and tp == cp == 1:
        if cfg_parallel:
            raise ParallelConfigError("--cfg-parallel needs 2 x TP ranks (e.g. torchrun --nproc_per_node 2)")
        return Ranks(), False
    owned = not dist.is_initialized()
    dims = initialize_distributed(tp=tp, cp=cp, seed=seed)
    have = (dist.get_world_size(dims.tp_group), dist.get_world_size(dims.cp_group))
    if have != (tp, cp):
        raise ParallelConfigError(f"torch.distributed is already set up with TP={have[0]} CP={have[1]}, but "
                                  f"--tensor-model-parallel-size {tp} --context-parallel-size {cp} was asked")
    ranks = Ranks(dims, init_cfg_parallel(dims) if cfg_parallel else None)
    if parallel_vae_decode:
        group = group_by(ranks.replica)
        if (dist.get_rank(group) == 0) != ranks.writer:
            raise ParallelConfigError("parallel VAE decode: the replica's first rank is not its writer (unexpected "
                                      "megatron rank order)")
        ranks = dataclasses.replace(ranks, decode_group=group)
    return ranks, owned


def release_parallel(owned: bool) -> None:
    """Tear down the process groups `init_parallel` created (none when it found them already set up)."""
    if owned:
        from ..parallel import destroy_distributed

        destroy_distributed()


__all__ = ["Ranks", "init_parallel", "release_parallel"]
