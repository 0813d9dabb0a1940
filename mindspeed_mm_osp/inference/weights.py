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
        if "lora" in source[3][0]:
            raise CheckpointError(f"{path}: holds LoRA adapters only, not base weights; give the base weights here "
                                  "and the adapters with --lora (inference) or --lora-load (training)")
        key = "ema_model" if all("ema_model" in state for state in source[3]) else "model"
        if key == "model":
            logger.warning("%s has no EMA weights; using the model weights", path)
        return merge_entry(*source, key).state_dict
    if path.name == MODEL_FILE:
        raise CheckpointError(f"{path}: one TP shard of a training checkpoint; pass its checkpoint folder instead")
    return load_weights(path)


def apply_adapters(model, path: Path | str, scale: float = 1.0) -> list[str]:
    """Apply the LoRA adapters of an adapter checkpoint (`--lora`; root or `iter_XXXXXXX` folder, any TP size)
    to `model` unmerged, their contribution multiplied by `scale` (`--lora-scale`); returns the adapted layers.

    The adapters (not their EMA: after a short fine-tune the EMA is still close to B = 0; fold the EMA with
    `convert_mm_to_ckpt.py --lora-merge --ema`) must have been trained on a base of this model's config.
    """
    from ..models.lora import apply_lora, check_base, load_lora_state_dict
    from ..models.predictor import shard_state_dict

    source = read_checkpoint(path)
    files, states = source[2], source[3]
    if "lora" not in states[0]:
        raise CheckpointError(f"{files[0]}: no 'lora' entry, not a LoRA adapter checkpoint; pass full weights "
                              "with --predictor-weights")
    try:
        config = check_base(states[0]["lora"], model.predictor_config, str(path))
        adapters = merge_entry(*source, "model").state_dict
        names = apply_lora(model, config, scale)
        load_lora_state_dict(model, shard_state_dict(adapters, model.ctx.tp_rank, model.ctx.tp_size), str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    model.eval().requires_grad_(False)  # the new LoRALinear modules start in training mode
    logger.info("LoRA adapters from %s on %d layers (scale %s)", path, len(names), scale)
    return names


__all__ = ["apply_adapters", "load_predictor_weights"]
