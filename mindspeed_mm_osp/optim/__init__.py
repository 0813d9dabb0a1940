"""Optimizer, LR schedule and gradient clipping for training (training.md §1-2, integration doc §1-3)."""

from .adaptive_clip import AdaptiveGradClip, ClipDecision, ClipStepResult, clip_and_step
from .fused_ema_adamw import EMA_KEY, FusedEmaAdamW, ema_decay_at, ema_state_dict
from .megatron import (
    OptimizerSettings,
    build_lr_scheduler,
    build_optimizer,
    gather_model_space,
    scatter_model_space,
)

__all__ = [
    "AdaptiveGradClip", "ClipDecision", "ClipStepResult", "EMA_KEY", "FusedEmaAdamW", "OptimizerSettings",
    "build_lr_scheduler", "build_optimizer", "clip_and_step", "ema_decay_at", "ema_state_dict",
    "gather_model_space", "scatter_model_space",
]
