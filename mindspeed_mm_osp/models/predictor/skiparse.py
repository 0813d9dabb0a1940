"""Skiparse ("sparse1d") token regrouping of Open-Sora Plan v1.5, as pure index maps.

A sparse block with sparse_n = k pads the video sequence to L' (a multiple of k^2; docs/model.md, "Skiparse
attention", has the rules and worked examples) and splits it into k groups of L'/k tokens that attend only among
themselves (plus all text). Groups go to the batch dim with new batch index g*B + b (group-major). For raster
index p:

* single skip (even blocks): g = p mod k, q = p div k                       (inverse p = q*k + g)
* group skip (odd blocks):   p = n*k^2 + m*k + j -> g = m, q = n*k + j      (inverse p = n*k^2 + g*k + j, n = q div k,
  j = q mod k)

Both maps are views/permutes of the (seq, batch, ...) tensor, so the regrouping never copies index tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import attention


def padded_length(length: int, k: int) -> int:
    """L' = L rounded up to a multiple of k^2 (also for single skip, as the reference)."""
    return -(-length // (k * k)) * (k * k)


def skiparse_index(k: int, group: bool, p: torch.Tensor | int):
    """(group g, position q) of raster index p (formulas in docs/model.md, "Skiparse attention")."""
    if not group:
        return p % k, p // k
    n, m, j = p // (k * k), (p // k) % k, p % k
    return m, n * k + j


def skiparse_inverse_index(k: int, group: bool, g: torch.Tensor | int, q: torch.Tensor | int):
    """Raster index p of (group g, position q)."""
    if not group:
        return q * k + g
    return (q // k) * k * k + g * k + q % k


def skiparse_permute(x: torch.Tensor, k: int, group: bool) -> torch.Tensor:
    """(L', B, *rest) -> (L'/k, k*B, *rest); L' must be a multiple of k^2."""
    lp, b, rest = x.shape[0], x.shape[1], x.shape[2:]
    if lp % (k * k):
        raise ValueError(f"skiparse needs a length divisible by k^2={k * k}, got {lp}; pad with pad_to_skiparse first")
    if not group:
        # p = q*k + g: (q, g, b) is already group-major in the flattened batch.
        return x.reshape(lp // k, k * b, *rest)
    # p = n*k^2 + m*k + j: (n, m, j, b) -> (n, j, m, b) -> q = n*k + j, batch = m*B + b.
    y = x.reshape(lp // (k * k), k, k, b, *rest).transpose(1, 2)
    return y.reshape(lp // k, k * b, *rest)


def skiparse_unpermute(x: torch.Tensor, k: int, group: bool) -> torch.Tensor:
    """Inverse of `skiparse_permute`: (L'/k, k*B, *rest) -> (L', B, *rest)."""
    lq, kb, rest = x.shape[0], x.shape[1], x.shape[2:]
    b = kb // k
    if not group:
        return x.reshape(lq * k, b, *rest)
    y = x.reshape(lq // k, k, k, b, *rest).transpose(1, 2)
    return y.reshape(lq * k, b, *rest)


def pad_to_skiparse(x: torch.Tensor, k: int, value: float | bool = 0) -> torch.Tensor:
    """Pad dim 0 of (L, ...) at the end to `padded_length(L, k)`."""
    pad = padded_length(x.shape[0], k) - x.shape[0]
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - 1) + [0, pad]
    if x.dtype == torch.bool:
        return F.pad(x.to(torch.uint8), widths, value=int(value)).bool()
    return F.pad(x, widths, value=value)


def skiparse_groups(length: int, k: int, group: bool) -> list[list[int | None]]:
    """Raster indices of each group in attention order; None marks a padding token (for docs and tests)."""
    lp = padded_length(length, k)
    ids = skiparse_permute(torch.arange(lp)[:, None], k, group)  # (L'/k, k)
    return [[int(i) if i < length else None for i in ids[:, g]] for g in range(k)]


def skiparse_key_mask(video_valid: torch.Tensor, text_valid: torch.Tensor, k: int, group: bool) -> torch.Tensor:
    """Key-padding mask (k*B, L'/k + S), True = attend: permuted video validity (padding masked), then text
    validity repeated per group. Video and text keys appear in the same order as in the attention."""
    vv = pad_to_skiparse(video_valid.t(), k, value=False)           # (L', B)
    vv = skiparse_permute(vv, k, group).t()                           # (k*B, L'/k)
    return torch.cat([vv, text_valid.repeat(k, 1)], dim=1)


def skiparse_attention(qx: torch.Tensor, kx: torch.Tensor, vx: torch.Tensor, qc: torch.Tensor, kc: torch.Tensor,
                       vc: torch.Tensor, key_valid: torch.Tensor, k: int,
                       group: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint video+text attention with skiparse grouping (k = 1: dense joint attention).

    qx/kx/vx: video (L, B, heads, hd); qc/kc/vc: text (S, B, heads, hd); key_valid: `skiparse_key_mask(...)`,
    (k*B, L'/k + S). Video is padded to L' and regrouped into the batch; text is repeated per group, and its
    outputs are averaged back over the k copies (each saw another video group). Returns video (L, B, heads, hd)
    and text (S, B, heads, hd).
    """
    length = qx.shape[0]
    if k > 1:
        qx, kx, vx = (skiparse_permute(pad_to_skiparse(t, k), k, group) for t in (qx, kx, vx))
        qc, kc, vc = (t.repeat(1, k, 1, 1) for t in (qc, kc, vc))  # batch index g*B + b -> sample b
    n_video = qx.shape[0]
    # (seq, batch, heads, hd) -> (batch, heads, seq, hd) for the kernel, and back
    out = attention(*(torch.cat(pair).permute(1, 2, 0, 3) for pair in ((qx, qc), (kx, kc), (vx, vc))),
                    key_valid=key_valid).permute(2, 0, 1, 3)
    ox, oc = out[:n_video], out[n_video:]
    if k > 1:
        ox = skiparse_unpermute(ox, k, group)[:length]
        oc = oc.unflatten(1, (k, -1)).mean(1)
    return ox, oc


__all__ = [
    "pad_to_skiparse", "padded_length", "skiparse_groups", "skiparse_index", "skiparse_inverse_index",
    "skiparse_attention", "skiparse_key_mask", "skiparse_permute", "skiparse_unpermute",
]
