"""LoRA adapters on the inference predictor (`--lora`, `--lora-scale`).

The base weights themselves (released `model_ema.pt`, merged files or a training checkpoint folder) are read
by `checkpoint.weights.load_predictor_weights`, shared with training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoint.layout import CheckpointError
from ..checkpoint.weights import load_lora_adapters

logger = logging.getLogger(__name__)


def apply_adapters(model, path: Path | str, scale: float = 1.0) -> list[str]:
    """Apply the LoRA adapters of an adapter checkpoint (`--lora`; root or `iter_XXXXXXX` folder, any TP size)
    to `model` unmerged, their contribution multiplied by `scale` (`--lora-scale`); returns the adapted layers.

    The adapters (not their EMA: after a short fine-tune the EMA is still close to B = 0; fold the EMA with
    `convert_mm_to_ckpt.py --lora-merge --ema`) must have been trained on a base of this model's config.
    """
    from ..models.lora import apply_lora, check_base, load_lora_state_dict
    from ..models.predictor import shard_state_dict

    metadata, adapters = load_lora_adapters(path)
    try:
        config = check_base(metadata, model.predictor_config, str(path))
        names = apply_lora(model, config, scale)
        load_lora_state_dict(model, shard_state_dict(adapters, model.ctx.tp_rank, model.ctx.tp_size), str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    model.eval().requires_grad_(False)  # the new LoRALinear modules start in training mode
    logger.info("LoRA adapters from %s on %d layers (scale %s)", path, len(names), scale)
    return names


__all__ = ["apply_adapters"]
