"""Optimizer, LR schedule and gradient clipping for training (docs/optimizer.md).

The public API is what this package exports: checkpoints save and restore optimizer state through
`optimizer_state_for_save` / `load_optimizer_state` / `reset_optimizer_state`, never through the megatron
wrapper's internals.
"""

from .adaptive_clip import AdaptiveGradClip, ClipDecision, ClipStepResult, clip_and_step
from .fused_ema_adamw import EMA_KEY, FusedEmaAdamW, ema_decay_at
from .megatron import (
    OptimizerSettings,
    build_lr_scheduler,
    build_optimizer,
    ema_state_dict,
    gather_model_space,
    gathers_locally,
    load_optimizer_state,
    optimizer_state_for_save,
    reset_optimizer_state,
    scatter_model_space,
    schedule_mismatches,
)

__all__ = [
    "AdaptiveGradClip", "ClipDecision", "ClipStepResult", "EMA_KEY", "FusedEmaAdamW", "OptimizerSettings",
    "build_lr_scheduler", "build_optimizer", "clip_and_step", "ema_decay_at", "ema_state_dict",
    "gather_model_space", "gathers_locally", "load_optimizer_state", "optimizer_state_for_save", "reset_optimizer_state",
    "scatter_model_space", "schedule_mismatches",
]
