"""Predictor weights for inference: released `model_ema.pt`, our merged files, or a training checkpoint folder.

Any of them loads at any TP size: the merged (TP=1 view) state dict is sliced for this rank by
`load_merged_state_dict`, and the model is built with the final block's text params exactly when the
weights carry them (the release, trained at TP>1, does; see `PredictorConfig.final_block_text_params`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint.convert import load_weights, merge_entry, read_checkpoint
from ..checkpoint.layout import MODEL_FILE, CheckpointError

logger = logging.getLogger(__name__)


def load_predictor_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Merged state dict from a weights file (.pt/.pth/.ckpt/.safetensors, wrapped or flat) or from a training
    checkpoint (root with tracker or one `iter_XXXXXXX` folder, any TP size; its EMA when it has one)."""
    path = Path(path)
    if path.is_dir():
        source = read_checkpoint(path)
        key = "ema_model" if all("ema_model" in state for state in source[3]) else "model"
        if key == "model":
            logger.warning("%s has no EMA weights; using the model weights", path)
        return merge_entry(*source, key).state_dict
    if path.name == MODEL_FILE:
        raise CheckpointError(f"{path}: one TP shard of a training checkpoint; pass its checkpoint folder instead")
    return load_weights(path)


__all__ = ["load_predictor_weights"]
