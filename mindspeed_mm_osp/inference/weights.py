"""LoRA adapters on the inference predictor (`--lora`, `--lora-scale`).

The base weights themselves (released `model_ema.pt`, merged files or a training checkpoint folder) are read
by `checkpoint.convert.load_predictor_weights`, shared with training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoint.convert import merge_entry, read_checkpoint
from ..checkpoint.layout import CheckpointError

logger = logging.getLogger(__name__)


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


__all__ = ["apply_adapters"]
