"""Activation memory and step time of the predictor with no / selective-FFN / full-block recompute.

Model: the tiny 7-stage config (14 blocks, width 64) on a long sequence. Activation memory is
* CPU: bytes of the distinct tensor storages saved for backward during the forward (counted with
  `torch.autograd.graph.saved_tensors_hooks`, parameters excluded) - what stays alive until backward;
* accelerator: peak allocated memory during forward + backward above the level before the forward.

    python bench/bench_recompute.py           # latent 8x64x64 -> 8192 video tokens
    python bench/bench_recompute.py --quick   # latent 4x32x32 -> 1024 video tokens, < 1 min

CPU runs default to 1 thread (`--threads`): on a shared 2-core box, 2 OpenMP threads were ~8x slower.
"""

from __future__ import annotations

import argparse

import torch

from _timing import median_seconds
from mindspeed_mm_osp import platform
from mindspeed_mm_osp.config.predictor import RecomputeConfig
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, local_state_dict
from mindspeed_mm_osp.testing import TINY_PREDICTOR_7_STAGES, tiny_predictor_config
from mindspeed_mm_osp.training.memory_measure import SavedTensorBytes

MODES = {"none": None, "selective FFN (14)": RecomputeConfig(selective_ffn_layers=14),
         "full block (14)": RecomputeConfig(granularity="full", num_layers=14)}


def run(model, inputs, iters: int, loss_scale: float = 1.0) -> tuple[float, int]:
    """Median forward + backward seconds, and the activation bytes of one step (saved for backward on CPU,
    peak allocated above the start on an accelerator)."""
    def step(counter=None):
        model.zero_grad(set_to_none=True)
        if counter is None:
            out = model(*inputs)
        else:
            with counter.record():
                out = model(*inputs)
        (out.float().square().mean() * loss_scale).backward()

    on_cpu = platform.accelerator() == "cpu"
    counter = SavedTensorBytes(model) if on_cpu else None
    platform.synchronize()
    platform.reset_peak_memory_stats()
    before = platform.max_memory_allocated()
    step(counter)  # also the warm-up
    platform.synchronize()
    memory = counter.total if on_cpu else platform.max_memory_allocated() - before
    return median_seconds(step, iters, warmup=0), memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (ignored on accelerators)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    platform.adapt_megatron()  # megatron's checkpoint saves/restores the "CUDA" RNG state
    frames, size = (4, 32) if args.quick else (8, 64)
    iters = args.iters or (1 if args.quick else 2)
    dev = platform.device()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, frames, size, size, generator=g).to(dev), torch.tensor([500.0], device=dev),
              torch.randn(1, 64, 24, generator=g).to(dev), None, None, torch.randn(1, 16, generator=g).to(dev))
    cfg = tiny_predictor_config(TINY_PREDICTOR_7_STAGES)
    torch.manual_seed(0)
    reference_sd = local_state_dict(SparseUMMDiT(cfg))

    kind = "saved-for-backward bytes" if platform.accelerator() == "cpu" else "peak allocated above start"
    print(f"device={dev} threads={torch.get_num_threads()} video_tokens={frames * (size // 2) ** 2} text_tokens=64 "
          f"blocks=14 width=64 fp32; memory = {kind}; time = median of {iters} after a warm-up")
    rows = []
    for name, recompute in MODES.items():
        model = SparseUMMDiT(cfg, recompute=recompute).to(dev).train()
        load_merged_state_dict(model, reference_sd)
        rows.append((name, *run(model, inputs, iters)))
    base_t, base_m = rows[0][1], rows[0][2]
    print(f"{'recompute':<22}{'activation MiB':>16}{'vs none':>10}{'step s':>10}{'vs none':>10}")
    for name, t, mem in rows:
        print(f"{name:<22}{mem / 2**20:>16.1f}{mem / base_m:>10.2f}{t:>10.2f}{t / base_t:>10.2f}")


if __name__ == "__main__":
    main()
