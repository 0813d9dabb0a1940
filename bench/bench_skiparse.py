"""Skiparse joint attention vs dense joint attention on the same q/k/v (forward + backward).

Dense attention over L video + S text tokens costs ~(L+S)^2; skiparse with sparse_n = k runs k groups of
L/k + S tokens, ~(L/k + S)^2 * k, so the ideal speed-up approaches k for S << L/k. Both go through the same kernel
(`models.attention.attention`); skiparse adds the permutes, the text repeat and the text mean.

    python bench/bench_skiparse.py           # 8192 video + 64 text tokens, 4 heads x 64, k = 2, 4, 8
    python bench/bench_skiparse.py --quick   # 2048 video tokens, < 1 min

CPU runs default to 1 thread (`--threads`): on a shared 2-core box, 2 OpenMP threads were ~8x slower.
"""

from __future__ import annotations

import argparse

import torch

from _timing import median_seconds
from mindspeed_mm_osp import platform
from mindspeed_mm_osp.models.predictor import skiparse_attention, skiparse_key_mask


def step_time(k: int, group: bool, tensors, key_valid, iters: int) -> float:
    def step():
        leaves = [t.detach().requires_grad_() for t in tensors]
        ox, oc = skiparse_attention(*leaves, key_valid=key_valid, k=k, group=group)
        (ox.sum() + oc.sum()).backward()

    return median_seconds(step, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--video-tokens", type=int, default=None)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (ignored on accelerators)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length = args.video_tokens or (2048 if args.quick else 8192)
    iters = args.iters or (2 if args.quick else 3)
    dev, dtype = platform.device(), getattr(torch, args.dtype)
    batch, heads, head_dim, s = 1, 4, 64, args.text_tokens

    g = torch.Generator().manual_seed(0)
    make = lambda n: torch.randn(n, batch, heads, head_dim, generator=g).to(dev, dtype)  # noqa: E731
    tensors = [make(length) for _ in range(3)] + [make(s) for _ in range(3)]
    video_valid = torch.ones(batch, length, dtype=torch.bool, device=dev)
    text_valid = torch.ones(batch, s, dtype=torch.bool, device=dev)

    print(f"device={dev} dtype={args.dtype} threads={torch.get_num_threads()} video={length} text={s} "
          f"heads={heads}x{head_dim} batch={batch} fwd+bwd, median of {iters}")
    dense = step_time(1, False, tensors, skiparse_key_mask(video_valid, text_valid, 1, False), iters)
    print(f"{'mode':<14}{'k':>3}{'ms':>10}{'speed-up vs dense':>20}{'ideal':>8}")
    print(f"{'dense':<14}{1:>3}{dense * 1e3:>10.1f}{1.0:>20.2f}{1.0:>8.2f}")
    for k in (2, 4, 8):
        ideal = (length + s) ** 2 / (k * (length / k + s) ** 2)
        for group in (False, True):
            t = step_time(k, group, tensors, skiparse_key_mask(video_valid, text_valid, k, group), iters)
            name = "group-skip" if group else "single-skip"
            print(f"{name:<14}{k:>3}{t * 1e3:>10.1f}{dense / t:>20.2f}{ideal:>8.2f}")


if __name__ == "__main__":
    main()
