"""Distributed initialisation, the parallel layout passed to every part, and the megatron-core config shared by
layers, DDP and finalize."""

from .dims import ParallelDims, ParallelLayout
from .init import ParallelConfigError, check_layout, destroy_distributed, initialize_distributed, set_seed
from .transformer_config import make_transformer_config

__all__ = [
    "ParallelConfigError", "ParallelDims", "ParallelLayout", "check_layout", "destroy_distributed",
    "initialize_distributed", "make_transformer_config", "set_seed",
]
