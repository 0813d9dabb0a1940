"""Predictor weights for a run: base weights for training (`from_pretrained`, LoRA base) and inference
(`--predictor-weights`), and LoRA adapters for inference (`--lora`), from any file or checkpoint `reader` opens."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .convert import full_state
from .layout import MODEL_FILE, CheckpointError
from .reader import load_weights_shard

logger = logging.getLogger(__name__)


def load_predictor_shard(path: Path | str, tp_rank: int, tp_size: int, verify: bool = False) -> dict[str, torch.Tensor]:
    """This TP rank's shard (`models.predictor.tp_layout`) of the predictor weights in a weights file
    (.pt/.pth/.ckpt/.safetensors, wrapped or flat; only the shard is read, `reader.load_weights_shard`) or in a
    training checkpoint (root with tracker or one `iter_XXXXXXX` folder, any TP size; its EMA when it has one;
    merged, then sliced). `verify`: check checksums (the manifest's, or a merged file's own)."""
    from ..models.predictor import shard_state_dict

    path = Path(path)
    if path.is_dir():
        source = full_state(path, verify=verify, weights_only=True)  # legacy or torch_dist
        if source.state.get("lora") is not None:
            raise CheckpointError(f"{path}: holds LoRA adapters only, not base weights; give the base weights here "
                                  "and the adapters with --lora (inference) or --lora-load (training)")
        key = "ema_model" if "ema_model" in source.state else "model"
        if key == "model":
            logger.warning("%s has no EMA weights; using the model weights", path)
        return shard_state_dict(source.merged(key).state_dict, tp_rank, tp_size)
    if path.name == MODEL_FILE:
        raise CheckpointError(f"{path}: one TP shard of a training checkpoint; pass its checkpoint folder instead")
    return load_weights_shard(path, tp_rank, tp_size, verify)


def load_predictor_weights(path: Path | str, verify: bool = False) -> dict[str, torch.Tensor]:
    """The whole merged predictor state dict of any source `load_predictor_shard` reads (its TP=1 shard)."""
    return load_predictor_shard(path, 0, 1, verify)


def load_lora_adapters(path: Path | str, verify: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LoRA metadata, adapters merged over their TP ranks) of an adapter checkpoint (root or one iteration)."""
    source = full_state(path, verify=verify, weights_only=True)  # legacy or torch_dist
    if source.state.get("lora") is None:
        raise CheckpointError(f"{source.directory}: no 'lora' entry, not a LoRA adapter checkpoint; pass full weights "
                              "with --predictor-weights")
    return source.state["lora"], source.merged("model").state_dict


__all__ = ["load_lora_adapters", "load_predictor_shard", "load_predictor_weights"]
