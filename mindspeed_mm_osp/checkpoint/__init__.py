"""Training checkpoints in the Megatron legacy layout (docs/checkpoints.md): save and resume (`checkpointing`), reading
(`reader`), runtime weights (`weights`), merge/split (`convert`)."""

from .checkpointing import CHECKPOINT_VERSION, OPTIMIZER_FORMAT, LoadedCheckpoint, load_checkpoint, save_checkpoint
from .layout import CheckpointError, CheckpointWriteError, read_tracker

__all__ = [
    "CHECKPOINT_VERSION", "CheckpointError", "CheckpointWriteError", "LoadedCheckpoint", "OPTIMIZER_FORMAT",
    "load_checkpoint", "read_tracker", "save_checkpoint",
]
