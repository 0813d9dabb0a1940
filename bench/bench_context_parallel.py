"""Per-rank activation memory and step time of the predictor at CP = 1 / 2 / 4 (Ulysses), side by side.

Model: 3 blocks (sparse k = 4, 8, 4), width 64 (4 heads x 16), fp32, on a 16384-token video (latent 16x64x64,
patch 2) + 32 text tokens. Each CP size runs on that many forked CPU ranks (gloo). Activation memory is the
bytes of the distinct storages saved for backward during the forward on a rank (`saved_tensors_hooks`,
parameters excluded; on an accelerator the peak allocated memory above the start), the max over ranks; step time
is the median forward + backward of rank 0 (CP ranks run in lock step).

    python bench/bench_context_parallel.py           # 16384 video tokens
    python bench/bench_context_parallel.py --quick   # 4096 video tokens, < 1 min

On this 2-core machine CP=4 runs 4 ranks on 2 cores, so its step time measures oversubscription, not CP; the
memory ratio is the figure that transfers. The all-to-all volume per layer printed at the end is the formula of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

import torch

from bench_recompute import run
from mindspeed_mm_osp import platform
from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, local_state_dict
from mindspeed_mm_osp.testing import run_distributed

MODEL = dict(num_layers=[1, 1, 1], sparse_n=[4, 8, 4], num_heads=4, head_dim=16, in_channels=4,
             timestep_embed_dim=32, caption_channels=24, pooled_projection_dim=16)
TEXT = 32


def _rank(rank, world_size, cfg, state_dict, inputs, iters):
    from mindspeed_mm_osp.parallel.context_parallel import loss_scale_for_grads

    torch.set_num_threads(1)
    model = SparseUMMDiT(cfg).train()
    load_merged_state_dict(model, state_dict)
    return run(model, inputs, iters, loss_scale=loss_scale_for_grads())


def all_to_all_bytes(tokens: int, text: int, hidden: int, cp: int, tp: int = 1, batch: int = 1,
                     bytes_per_el: int = 4) -> tuple[float, float]:
    """Bytes one rank sends per block, forward (backward is the same again): q, k, v in and the output back
    (4 all-to-alls of its (L/CP) x B x D/TP shard, (CP-1)/CP of it leaves the rank), plus the text head
    all-gather ((CP-1)/CP of S x B x D/TP received)."""
    frac = (cp - 1) / cp
    video = 4 * frac * (tokens / cp) * batch * hidden / tp * bytes_per_el
    text_gather = frac * text * batch * hidden / tp * bytes_per_el
    return video, text_gather


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()
    frames, size = (4, 64) if args.quick else (16, 64)
    tokens = frames * (size // 2) ** 2
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, frames, size, size, generator=g), torch.tensor([500.0]),
              torch.randn(1, TEXT, 24, generator=g), None, None, torch.randn(1, 16, generator=g))
    cfg = from_dict(PredictorConfig, MODEL)
    torch.manual_seed(0)
    state_dict = local_state_dict(SparseUMMDiT(cfg))
    kind = "saved-for-backward bytes" if platform.accelerator() == "cpu" else "peak allocated above start"
    print(f"video_tokens={tokens} text_tokens={TEXT} blocks=3 (k=4,8,4) width=64 fp32, 1 thread per rank; "
          f"memory = {kind} (max over ranks); time = rank 0 median of {args.iters} after a warm-up")
    rows = []
    for cp in (1, 2, 4):
        ranks = run_distributed(_rank, cp, cfg, state_dict, inputs, args.iters, cp=cp, timeout=1800)
        rows.append((cp, ranks[0][0], max(m for _, m in ranks)))
    base_t, base_m = rows[0][1], rows[0][2]
    print(f"{'CP':<6}{'activation MiB/rank':>22}{'vs CP=1':>10}{'step s':>10}{'vs CP=1':>10}")
    for cp, t, mem in rows:
        print(f"{cp:<6}{mem / 2**20:>22.1f}{mem / base_m:>10.2f}{t:>10.2f}{t / base_t:>10.2f}")
    print("all-to-all bytes sent per rank per block, forward (backward the same):")
    for name, (n, s, d, tp, el) in {"this bench (fp32)": (tokens, TEXT, 64, 1, 4),
                                    "release 121x576x1024, 512 text, D=3072, TP=1, bf16": (36864, 512, 3072, 1, 2)
                                    }.items():
        for cp in (2, 4, 8):
            video, text = all_to_all_bytes(n, s, d, cp, tp, bytes_per_el=el)
            print(f"  {name}, CP={cp}: video {video / 2**20:.2f} MiB + text gather {text / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
