"""`ParallelDims`: where this rank sits (sizes, ranks, process groups), built once and passed explicitly.

Megatron keeps the same facts in module globals (`parallel_state`); reading them from deep inside the data,
checkpoint and model code hides which parts depend on the layout. The trainer and the inference runner build one
`ParallelDims` right after the process groups exist and hand it to whatever needs a rank or a group, in the manner
of torchtitan's `ParallelDims`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist



@dataclass(frozen=True)
class ParallelLayout:
    """The sizes alone (validated by `init.check_layout`): world = TP x CP x DP."""

    world_size: int
    tensor_parallel: int
    data_parallel: int
    pipeline_parallel: int = 1
    context_parallel: int = 1


@dataclass(frozen=True)
class ParallelDims:
    """Sizes and this rank's coordinates; world = TP x CP x DP. The groups are None in a single process.

    `dp_*` leaves out CP (it shards the data), `dp_cp_*` includes it (the ranks that hold the same model shard:
    gradient reduction, the distributed optimizer, checkpoint writers)."""

    layout: ParallelLayout
    rank: int = 0
    tp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    dp_cp_rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None
    cp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    dp_cp_group: Optional[dist.ProcessGroup] = None

    @classmethod
    def single(cls) -> "ParallelDims":
        """One process, no process groups (tools, tests, single-device inference)."""
        return cls(ParallelLayout(world_size=1, tensor_parallel=1, data_parallel=1))

    @classmethod
    def from_megatron(cls, layout: ParallelLayout) -> "ParallelDims":
        """Read the ranks and groups megatron-core built for `layout` (called once, by `initialize_distributed`)."""
        from megatron.core import parallel_state as ps

        return cls(
            layout=layout, rank=dist.get_rank(),
            tp_rank=ps.get_tensor_model_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            tp_group=ps.get_tensor_model_parallel_group(), cp_group=ps.get_context_parallel_group(),
            dp_group=ps.get_data_parallel_group(),
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        )

    @classmethod
    def current(cls) -> "ParallelDims":
        """The layout of the groups already built, or `single()` when there are none: for library entry points
        (model builders, tools) called without dims, e.g. from tests that set up megatron themselves."""
        from megatron.core import parallel_state as ps

        if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
            return cls.single()
        tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
        return cls.from_megatron(ParallelLayout(world_size=dist.get_world_size(), tensor_parallel=tp,
                                                data_parallel=dist.get_world_size() // (tp * cp), context_parallel=cp))

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp(self) -> int:
        return self.layout.tensor_parallel

    @property
    def cp(self) -> int:
        return self.layout.context_parallel

    @property
    def dp(self) -> int:
        return self.layout.data_parallel

    @property
    def distributed(self) -> bool:
        return self.tp_group is not None
