"""Whole predictor, sparse1d=true (SUV) vs sparse1d=false (dense MMDiT), same weights, forward + backward.

Release stage layout (num_layers [2,4,6,8,6,4,2], sparse_n [1,2,4,8,4,2,1], 32 blocks, double_ff) scaled to width
256 (4 heads x 64). The attention share is the time of the attention kernel ops (SDPA forward and backward) in a
torch.profiler trace, over the total profiled op time.

    python bench/bench_suv_vs_dense.py           # latent 4x64x64 -> 4096 video tokens, 64 text tokens
    python bench/bench_suv_vs_dense.py --quick   # latent 4x16x16 -> 256 video tokens, < 1 min

CPU runs default to 1 thread (`--threads`): on a shared 2-core box, 2 OpenMP threads were ~8x slower.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from _timing import median_seconds
from mindspeed_mm_osp import platform
from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, local_state_dict

LAYOUT = dict(num_layers=[2, 4, 6, 8, 6, 4, 2], sparse_n=[1, 2, 4, 8, 4, 2, 1], num_heads=4, head_dim=64,
              in_channels=32, timestep_embed_dim=256, caption_channels=128, pooled_projection_dim=64)


def inputs(frames: int, size: int, text: int, dev: torch.device):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 32, frames, size, size, generator=g).to(dev), torch.tensor([500.0], device=dev),
            torch.randn(1, text, 128, generator=g).to(dev), None, None, torch.randn(1, 64, generator=g).to(dev))


def step(model, args):
    model.zero_grad(set_to_none=True)
    model(*args).float().square().mean().backward()


def timed(model, args, iters: int) -> float:
    return median_seconds(lambda: step(model, args), iters, warmup=0)


def attention_share(model, args) -> float:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if platform.accelerator() == "cuda" else [])
    with profile(activities=activities) as prof:
        step(model, args)
        platform.synchronize()
    device_time = platform.accelerator() == "cuda"
    total = attn = 0.0
    for e in prof.key_averages():
        t = e.self_device_time_total if device_time else e.self_cpu_time_total
        total += t
        if "scaled_dot_product" in e.key or "flash_attention" in e.key or "efficient_attention" in e.key:
            attn += t
    return attn / max(total, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (ignored on accelerators)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    frames, size = (4, 16) if args.quick else (4, 64)
    iters = args.iters or 1
    dev, dtype = platform.device(), getattr(torch, args.dtype)
    video_tokens = frames * (size // 2) ** 2

    torch.manual_seed(0)
    dense = SparseUMMDiT(from_dict(PredictorConfig, {**LAYOUT, "sparse1d": False}), params_dtype=dtype).to(dev).train()
    suv = SparseUMMDiT(from_dict(PredictorConfig, LAYOUT), params_dtype=dtype).to(dev).train()
    load_merged_state_dict(suv, local_state_dict(dense))
    x = inputs(frames, size, 64, dev)
    x = tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dim() > 1 else t for t in x)
    n_params = sum(p.numel() for p in dense.parameters())
    print(f"device={dev} dtype={args.dtype} threads={torch.get_num_threads()} params={n_params / 1e6:.1f}M "
          f"video_tokens={video_tokens} text_tokens=64 blocks=32 fwd+bwd, median of {iters} after a profiled warm-up")
    rows = []
    for name, model in (("dense (sparse1d=false)", dense), ("SUV (sparse1d=true)", suv)):
        share = attention_share(model, x)  # doubles as the warm-up step
        rows.append((name, timed(model, x, iters), share))
    print(f"{'model':<24}{'step s':>10}{'attention share':>18}")
    for name, t, share in rows:
        print(f"{name:<24}{t:>10.2f}{share * 100:>17.1f}%")
    print(f"SUV speed-up over dense: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
