"""Distributed initialisation and the megatron-core config shared by layers, DDP and finalize."""

from .init import (
    ParallelConfigError,
    ParallelLayout,
    check_layout,
    destroy_distributed,
    initialize_distributed,
    set_seed,
)
from .dims import ParallelDims
from .transformer_config import make_transformer_config

__all__ = [
    "ParallelConfigError", "ParallelDims", "ParallelLayout", "check_layout", "destroy_distributed", "initialize_distributed",
    "make_transformer_config", "set_seed",
]
