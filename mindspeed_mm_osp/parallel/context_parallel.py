"""Ulysses context parallelism (CP): the one place that moves activations between CP ranks.

Between attention calls each CP rank holds a contiguous shard of the video sequence (all heads). Around attention
an all-to-all turns that sequence shard into a head shard of the full sequence, so attention (and the skiparse
regroup, which needs the whole raster order) runs unchanged on `heads / CP` heads; the inverse all-to-all brings
the result back to the sequence shard. Text tokens are replicated on every CP rank: their heads are sliced
locally and gathered back after attention.

Gradient convention: every parameter is replicated over CP, and megatron-core DDP reduces grads over the DP x CP
group. Each computation that exists once in the CP=1 graph runs on exactly one CP rank here (sequence-sharded
work) or, when replicated (text stream, conditioning), only receives the gradient of that rank's own use (slices
backpropagate zeros elsewhere, the head gather reduce-scatters). So the CP ranks' grads SUM to the CP=1 grad;
`loss_scale_for_grads()` turns DDP's average over DP x CP back into that sum.

With sequence parallelism (SP) the sequence is split over CP first, then each CP shard over TP (megatron's
order), so a TP all-gather inside a column-parallel linear yields exactly this rank's CP shard.
"""

from __future__ import annotations

import torch

CP_ALGOS = ("ulysses_cp_algo",)


def check_context_parallel(size: int, algo: str) -> None:
    """The `--context-parallel-size/-algo` pair, checked once at startup (training and inference)."""
    from .init import ParallelConfigError

    if size < 1:
        raise ParallelConfigError(f"--context-parallel-size must be >= 1, got {size}")
    if algo not in CP_ALGOS:
        raise ParallelConfigError(
            f"--context-parallel-algo {algo} is not implemented; use {' or '.join(CP_ALGOS)} (Ulysses all-to-all). "
            "MindSpeed's megatron_cp_algo (ring attention), hybrid_cp_algo and the adaptive variants are not "
            "available here")


def _group():
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()


def context_parallel_size() -> int:
    """CP world size (1 when megatron's groups are not initialised)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def context_parallel_rank() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_context_parallel_rank()


def loss_scale_for_grads() -> int:
    """Factor on the (CP-replicated) loss before backward so DDP's mean over DP x CP equals the CP=1 mean over DP
    (megatron's schedules multiply by the CP size for the same reason)."""
    return context_parallel_size()


def split_sequence(x: torch.Tensor, cp: int, rank: int, multiple: int = 1) -> torch.Tensor:
    """This rank's shard of dim 0 of the replicated (seq, ...) tensor, after zero-padding the sequence to a
    multiple of `cp * multiple` (`multiple` = TP under SP, so every CP shard splits again over TP).

    Plain slicing: the backward leaves zeros outside the shard, i.e. the replicated producer (patch embedding)
    gets only this rank's share of the gradient and the DP x CP reduction sums the shares."""
    pad = -x.shape[0] % (cp * multiple)
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    if cp == 1:
        return x
    shard = x.shape[0] // cp
    return x[rank * shard:(rank + 1) * shard]


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    """All-gather dim 0 over CP (shards in rank order). The computation after it (output head, loss) is
    replicated on every CP rank, so the backward keeps this rank's slice of the gradient."""
    if context_parallel_size() == 1:
        return x
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=_group())


def sequence_to_heads(x: torch.Tensor) -> torch.Tensor:
    """All-to-all (s, B, H, d) sequence shard -> (cp*s, B, H/cp, d) full sequence with this rank's heads.

    Heads chunk j is sent to rank j; the chunk received from rank j is sequence shard j, so concatenating the
    received chunks gives the global order. The backward is the inverse all-to-all (megatron's `all_to_all`)."""
    cp = context_parallel_size()
    if cp == 1:
        return x
    from megatron.core import tensor_parallel

    s, b, h, d = x.shape
    send = x.reshape(s, b, cp, h // cp, d).permute(2, 0, 1, 3, 4).reshape(cp * s, b * (h // cp) * d)
    return tensor_parallel.all_to_all(_group(), send).reshape(cp * s, b, h // cp, d)


def heads_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `sequence_to_heads`: (cp*s, B, h, d) -> (s, B, cp*h, d)."""
    cp = context_parallel_size()
    if cp == 1:
        return x
    from megatron.core import tensor_parallel

    length, b, h, d = x.shape
    received = tensor_parallel.all_to_all(_group(), x.reshape(length, b * h * d))
    return received.reshape(cp, length // cp, b, h, d).permute(1, 2, 0, 3, 4).reshape(length // cp, b, cp * h, d)


def local_heads(x: torch.Tensor) -> torch.Tensor:
    """This rank's heads of a CP-replicated (S, B, H, d) tensor (text q/k/v); backward: zeros elsewhere."""
    cp = context_parallel_size()
    if cp == 1:
        return x
    h = x.shape[2] // cp
    rank = context_parallel_rank()
    return x[:, :, rank * h:(rank + 1) * h]


def gather_heads(x: torch.Tensor) -> torch.Tensor:
    """All-gather the last dim (flattened heads) of the text attention output over CP. Every CP rank continues
    the text stream on its own replica, so the backward sums their gradients and keeps this rank's heads."""
    if context_parallel_size() == 1:
        return x
    from megatron.core import tensor_parallel

    return tensor_parallel.all_gather_last_dim_from_tensor_parallel_region(x, group=_group())


__all__ = [
    "CP_ALGOS", "check_context_parallel", "context_parallel_rank", "context_parallel_size", "gather_heads", "gather_sequence",
    "heads_to_sequence", "local_heads", "loss_scale_for_grads", "sequence_to_heads", "split_sequence",
]
