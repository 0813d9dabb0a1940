"""Training checkpoints (docs/checkpoints.md) in the Megatron legacy layout or the torch_dist format: save and
resume (`formats`, dispatching to `checkpointing` and `dist_format`), reading (`reader`), runtime weights
(`weights`), merge/split/convert (`convert`)."""

from .checkpointing import CHECKPOINT_VERSION, OPTIMIZER_FORMAT, LoadedCheckpoint
from .formats import load_checkpoint, save_checkpoint
from .layout import CheckpointError, CheckpointWriteError, read_tracker

__all__ = [
    "CHECKPOINT_VERSION", "CheckpointError", "CheckpointWriteError", "LoadedCheckpoint", "OPTIMIZER_FORMAT",
    "load_checkpoint", "read_tracker", "save_checkpoint",
]
