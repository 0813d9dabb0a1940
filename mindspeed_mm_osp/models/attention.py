"""The one attention kernel entry point of the package.

Layout is (batch, heads, seq, head_dim). Masks are key-padding masks `(batch, seq_k)`, True = attend, broadcast
over heads and queries; a square `(seq_q, seq_k)` mask is never built on CPU/CUDA (the reference materialised one
per sparsity, ~1.4e9 elements per sample at release resolution).
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import platform


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bidirectional softmax attention, scale 1/sqrt(head_dim), no dropout.

    q: (B, N, Lq, d); k, v: (B, N, Lk, d); key_valid: (B, Lk) bool, True = real key.
    A row whose keys are all masked gets uniform weights (like the reference's finite -10000 bias) instead of NaN.
    """
    if platform.attention_backend() == "npu_fusion":
        return _npu_fusion_attention(q, k, v, key_valid)
    bias = None
    if key_valid is not None:
        # Finite large negative instead of -inf: a fully masked row stays finite.
        bias = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~key_valid, torch.finfo(q.dtype).min)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _npu_fusion_attention(q, k, v, key_valid):
    """Ascend fused kernel (`True` = masked). The kernel wants a (B, 1, Lq, Lk) mask; we pass an expanded view."""
    torch_npu = importlib.import_module("torch_npu")
    b, n, lq, d = q.shape
    mask = None
    if key_valid is not None:
        mask = (~key_valid)[:, None, None, :].expand(b, 1, lq, key_valid.shape[-1])
    return torch_npu.npu_fusion_attention(q, k, v, n, input_layout="BNSD", atten_mask=mask,
                                          scale=1.0 / math.sqrt(d), keep_prob=1.0)[0]


__all__ = ["attention"]
