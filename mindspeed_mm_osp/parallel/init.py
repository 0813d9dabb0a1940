"""Process groups and seeds from torchrun's environment, through megatron-core."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from .. import platform
from .dims import ParallelDims, ParallelLayout
from ..errors import UserError


class ParallelConfigError(UserError, ValueError):
    pass


def check_layout(world_size: int, tp: int, pp: int = 1, cp: int = 1) -> ParallelLayout:
    """Validate the requested layout before any group is built: world = TP x CP x DP."""
    if pp != 1:
        raise ParallelConfigError(
            f"--pipeline-model-parallel-size={pp} is not supported yet; use 1 (SparseUMMDiT trains with TP/SP/CP + DP)")
    if tp < 1 or world_size % tp != 0:
        raise ParallelConfigError(
            f"--tensor-model-parallel-size={tp} must divide the world size {world_size} "
            f"(nnodes x nproc_per_node); choose a divisor of {world_size}")
    if cp < 1 or world_size % (tp * cp) != 0:
        raise ParallelConfigError(
            f"--tensor-model-parallel-size={tp} x --context-parallel-size={cp} = {tp * cp} must divide the world "
            f"size {world_size} (nnodes x nproc_per_node); choose sizes whose product divides {world_size}")
    return ParallelLayout(world_size=world_size, tensor_parallel=tp, data_parallel=world_size // (tp * cp),
                          context_parallel=cp)


def initialize_distributed(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234,
                           timeout_minutes: float = 30.0, data_parallel_random_init: bool = False) -> ParallelDims:
    """Init torch.distributed (env:// from torchrun or a single process), megatron groups and seeds; returns the
    `ParallelDims` that callers pass on (the one read of megatron's rank globals)."""
    platform.adapt_megatron()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    layout = check_layout(world_size, tp, pp, cp)
    platform.set_device(local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend=platform.dist_backend(), rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 context_parallel_size=cp,
                                                 distributed_timeout_minutes=timeout_minutes)
    set_seed(seed, data_parallel_random_init=data_parallel_random_init)
    return ParallelDims.from_megatron(layout)


def set_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Per-rank seeds like Megatron: TP peers share the default stream for replicated
    parameters; megatron's tracker holds the TP-distinct stream for sharded weights/dropout."""
    from megatron.core import parallel_state, tensor_parallel

    if data_parallel_random_init:
        seed = seed + 10 * parallel_state.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
