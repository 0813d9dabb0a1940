"""Training checkpoints in the Megatron legacy layout (training.md §6); see `checkpointing` for the format."""

from .checkpointing import CHECKPOINT_VERSION, OPTIMIZER_FORMAT, LoadedCheckpoint, load_checkpoint, save_checkpoint
from .layout import CheckpointError, CheckpointWriteError, read_tracker

__all__ = [
    "CHECKPOINT_VERSION", "CheckpointError", "CheckpointWriteError", "LoadedCheckpoint", "OPTIMIZER_FORMAT",
    "load_checkpoint", "read_tracker", "save_checkpoint",
]
