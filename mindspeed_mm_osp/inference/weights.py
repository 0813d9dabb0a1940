"""LoRA adapters on the inference predictor (`--lora`, `--lora-scale`), and the sampling schedule of a distilled
student (docs/distillation.md) that its weights or adapters carry.

The base weights themselves (released `model_ema.pt`, merged files or a training checkpoint folder) are read
by `checkpoint.weights.load_predictor_weights`, shared with training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

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


def _recorded_student(weights: Optional[str], lora: Optional[str]) -> tuple[Optional[dict], str]:
    """(the student schedule record or None, where it was found): the adapter checkpoint's LoRA metadata, else a
    merged file's safetensors metadata or the `convert_info.json` written next to it."""
    from safetensors import safe_open

    from ..checkpoint.reader import read_checkpoint

    if lora:
        return (read_checkpoint(lora).lora or {}).get("distill"), str(lora)
    path = Path(weights) if weights else None
    if path is None or not path.is_file():
        return None, ""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get("student")
        return (json.loads(text) if text else None), str(path)
    info = path.parent / "convert_info.json"
    if info.is_file():
        record = json.loads(info.read_text(encoding="utf-8"))
        if path.name in record.get("files", []):
            return record.get("student"), str(info)
    return None, ""


def recorded_student(weights: Optional[str], lora: Optional[str]):
    """The `StudentSchedule` a distilled student's adapter checkpoint (`lora`) or merged weights file records, else
    None; logged, since it changes the sampler's defaults (K steps on its shift, CFG off)."""
    from ..diffusion.student import StudentSchedule

    record, source = _recorded_student(weights, lora)
    if record is None:
        return None
    try:
        student = StudentSchedule.from_record(record, source)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    logger.info("distilled student (%s): %d steps on shift %s, guidance %s folded in", source,
                student.student_steps, student.shift, student.guidance_scale)
    return student


__all__ = ["apply_adapters", "recorded_student"]
