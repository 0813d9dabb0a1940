"""The model inside its training wrappers (megatron DDP, Float16Module): its names are the checkpoint keys."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside megatron DDP / Float16Module wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


__all__ = ["unwrap"]
