"""Predictor weights for a run: base weights for training (`from_pretrained`, LoRA base) and inference
(`--predictor-weights`), and LoRA adapters for inference (`--lora`), from any file or checkpoint `reader` opens."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .convert import merge_entry
from .layout import MODEL_FILE, CheckpointError
from .reader import load_weights, read_checkpoint

logger = logging.getLogger(__name__)


def load_predictor_weights(path: Path | str, verify: bool = False) -> dict[str, torch.Tensor]:
    """Merged predictor state dict from a weights file (.pt/.pth/.ckpt/.safetensors, wrapped or flat) or from a
    training checkpoint (root with tracker or one `iter_XXXXXXX` folder, any TP size; its EMA when it has one).
    `verify`: check checksums (the manifest's, or a merged file's own)."""
    path = Path(path)
    if path.is_dir():
        source = read_checkpoint(path, verify=verify)
        if source.lora is not None:
            raise CheckpointError(f"{path}: holds LoRA adapters only, not base weights; give the base weights here "
                                  "and the adapters with --lora (inference) or --lora-load (training)")
        key = "ema_model" if source.has("ema_model") else "model"
        if key == "model":
            logger.warning("%s has no EMA weights; using the model weights", path)
        return merge_entry(source, key).state_dict
    if path.name == MODEL_FILE:
        raise CheckpointError(f"{path}: one TP shard of a training checkpoint; pass its checkpoint folder instead")
    return load_weights(path, verify)


def load_lora_adapters(path: Path | str, verify: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LoRA metadata, adapters merged over their TP ranks) of an adapter checkpoint (root or one iteration)."""
    source = read_checkpoint(path, verify=verify)
    if source.lora is None:
        raise CheckpointError(f"{source.files[0]}: no 'lora' entry, not a LoRA adapter checkpoint; pass full weights "
                              "with --predictor-weights")
    return source.lora, merge_entry(source, "model").state_dict


__all__ = ["load_lora_adapters", "load_predictor_weights"]
