"""Step time of FusedEmaAdamW against AdamW + a separate EMA pass, on fp32 params of realistic shapes.

The update is memory bound: the floor is 9 x 4 bytes/param (read g, p, m, v, s; write p, m, v, s). The
achieved rate is reported as those 36 bytes/param divided by the step time, next to a plain copy's bandwidth
(read + write) measured in the same run.

    python bench/bench_ema_optimizer.py            # 100M params
    python bench/bench_ema_optimizer.py --quick    # 10M params, < 1 min
"""

from __future__ import annotations

import argparse
import gc
import json
from typing import Callable

import torch

from _timing import median_seconds
from mindspeed_mm_osp import platform
from mindspeed_mm_osp.optim.fused_ema_adamw import FusedEmaAdamW, ema_decay_at

BYTES_PER_PARAM = 9 * 4
HIDDEN = 2048


def make_params(total: int, device: torch.device) -> list[torch.nn.Parameter]:
    """Transformer-like mix: HIDDEN x HIDDEN matrices plus one 1-D HIDDEN vector per matrix."""
    params, n = [], 0
    g = torch.Generator().manual_seed(0)
    while n < total:
        for shape in ((HIDDEN, min(HIDDEN, max(1, (total - n) // HIDDEN))), (HIDDEN,)):
            p = torch.nn.Parameter(torch.randn(*shape, generator=g).to(device))
            p.grad = torch.randn(*shape, generator=g).to(device) * 1e-2
            params.append(p)
            n += p.numel()
    return params


def timed(step: Callable[[], None], iters: int) -> float:
    return median_seconds(step, iters, warmup=2)


def copy_bandwidth(numel: int, device: torch.device, iters: int) -> float:
    """Bytes/s of `dst.copy_(src)` (counts read + write) over a buffer as large as one param set."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * 4 * numel / timed(lambda: dst.copy_(src), iters)


def with_separate_ema(opt: torch.optim.Optimizer, params: list, decay: float) -> Callable[[], None]:
    """Baseline: torch AdamW step, then one `_foreach_lerp_` pass over the EMA copies."""
    emas = [p.detach().clone() for p in params]
    count = [0]

    def step() -> None:
        opt.step()
        count[0] += 1
        torch._foreach_lerp_(emas, params, 1.0 - ema_decay_at(count[0], decay))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10M params instead of 100M")
    parser.add_argument("--params", type=int, default=None, help="override the parameter count")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()
    numel = args.params or (10_000_000 if args.quick else 100_000_000)
    iters = args.iters or (5 if args.quick else 10)
    device = platform.device()
    params = make_params(numel, device)
    numel = sum(p.numel() for p in params)
    hyper = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    decay = 0.9999

    # Factories: each variant's state (m, v, EMA: 3 x 4 bytes/param) is built, timed and freed in turn.
    variants: dict[str, Callable[[], Callable[[], None]]] = {
        "FusedEmaAdamW(foreach)": lambda: FusedEmaAdamW(params, ema_decay=decay, fused=False, **hyper).step,
        "FusedEmaAdamW(fused)": lambda: FusedEmaAdamW(params, ema_decay=decay, fused=True, **hyper).step,
        "AdamW(foreach)+lerp EMA": lambda: with_separate_ema(torch.optim.AdamW(params, foreach=True, **hyper),
                                                             params, decay),
        "AdamW(fused)+lerp EMA": lambda: with_separate_ema(torch.optim.AdamW(params, fused=True, **hyper),
                                                           params, decay),
    }
    bandwidth = copy_bandwidth(numel, device, iters)
    results = {}
    for name, factory in variants.items():
        step = factory()
        seconds = timed(step, iters)
        results[name] = {"ms": seconds * 1e3, "bytes_per_s": BYTES_PER_PARAM * numel / seconds}
        del step
        gc.collect()
        platform.empty_cache()
    base = results["AdamW(foreach)+lerp EMA"]["ms"]
    print(f"device={device} params={numel / 1e6:.1f}M tensors={len(params)} iters={iters} "
          f"threads={torch.get_num_threads()} copy bandwidth={bandwidth / 1e9:.1f} GB/s "
          f"(floor {BYTES_PER_PARAM} B/param -> {BYTES_PER_PARAM * numel / bandwidth * 1e3:.1f} ms)")
    print(f"{'variant':<26}{'ms/step':>10}{'vs AdamW(foreach)+EMA':>24}{'GB/s (36 B/param)':>20}{'% of copy':>11}")
    for name, r in results.items():
        print(f"{name:<26}{r['ms']:>10.1f}{base / r['ms']:>23.2f}x{r['bytes_per_s'] / 1e9:>20.1f}"
              f"{100 * r['bytes_per_s'] / bandwidth:>10.0f}%")
    print(json.dumps({"device": str(device), "params": numel, "copy_bytes_per_s": bandwidth, "results": results}))


if __name__ == "__main__":
    main()
