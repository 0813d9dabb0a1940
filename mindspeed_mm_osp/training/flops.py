"""Analytic FLOP count of SparseUMMDiT, for TFLOP/s and MFU in the training log.

Like Megatron's GPT formula: matmul FLOPs only (2 per multiply-add), training = 3x the
forward (backward is twice the forward), recomputation not counted (model FLOPs).
Attention is counted per skiparse group: a block with sparsity k runs k attentions over
(L_k/k video + S text) tokens, where L_k is L padded to a multiple of k^2.
"""

from __future__ import annotations

from ..config import PredictorConfig


def _padded(length: int, k: int) -> int:
    m = k * k
    return (length + m - 1) // m * m


def predictor_forward_flops(cfg: PredictorConfig, batch: int, latent_thw: tuple[int, int, int], text_len: int) -> float:
    t, h, w = latent_thw
    p, pt = cfg.patch_size, cfg.patch_size_t
    video = (t // pt) * (h // p) * (w // p)
    text = text_len
    d, e = cfg.hidden_size, cfg.timestep_embed_dim
    ffn = 4 * d
    sparse = cfg.sparse1d
    blocks = [(k if sparse else 1) for n, k in zip(cfg.num_layers, cfg.sparse_n) for _ in range(n)]
    flops = 0.0
    for k in blocks:
        flops += 2 * (video + text) * d * (3 * d)          # q, k, v of both streams
        flops += 2 * (video + text) * d * d                 # output projections
        ffn_tokens = video + text                           # double_ff: separate weights, same token count
        flops += 2 * ffn_tokens * d * ffn * 2               # FFN up + down
        flops += 2 * 2 * e * 6 * d                          # adaLN norm1/norm2 (per sample)
        video_k = _padded(video, k) if k > 1 else video
        per_group = video_k // k + text
        flops += k * 2 * 2 * per_group * per_group * d      # QK^T and AV
    skips = len(cfg.num_layers) // 2 if cfg.skip_connection else 0
    flops += skips * 2 * (video + text) * (2 * d) * d
    flops += 2 * video * (cfg.patch_embed_channels * p * p * pt) * d  # patch embedding
    flops += 2 * video * d * (p * p * pt * cfg.output_channels)       # proj_out
    flops += 2 * text * cfg.caption_channels * d                       # caption projection
    flops += 2 * (2 * e * e + cfg.pooled_projection_dim * e + e * e) + 2 * e * 2 * d  # conditioning + norm_out
    return batch * flops


def predictor_training_flops(cfg: PredictorConfig, batch: int, latent_thw: tuple[int, int, int], text_len: int) -> float:
    return 3.0 * predictor_forward_flops(cfg, batch, latent_thw, text_len)


def peak_flops_per_second() -> float:
    """Peak for MFU: bf16 dense peak of known accelerators, else a matmul measured here (CPU)."""
    import time

    import torch

    from .. import platform

    name = platform.device_name()
    if platform.accelerator() == "cuda":
        for key, tflops in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40", 181.0)):
            if key in name:
                return tflops * 1e12
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    reps = 8
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start)
