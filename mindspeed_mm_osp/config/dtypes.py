"""The dtype spellings the JSON files use, and their torch dtypes (one table for every component)."""

from __future__ import annotations

from typing import Literal

import torch

Dtype = Literal["fp32", "fp16", "bf16", "float32", "float16", "bfloat16", "half"]

_TORCH = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The config spellings ("fp16", "bf16", "float32", ...) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _TORCH[dtype]
    except KeyError as exc:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_TORCH)}") from exc


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> its short config spelling."""
    return _NAMES[dtype]
