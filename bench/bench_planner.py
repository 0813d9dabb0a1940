"""The memory planner against reality on the full accuracy grid (the test runs a subset).

Per point: saved-activation bytes (`saved_tensors_hooks`, storages deduplicated) and the weights / fp32 main
grads / optimizer-state bytes after one real step (megatron DDP + FusedEmaAdamW), measured vs
`training.memory_plan.plan_memory`; on an accelerator also the allocated peak of a steady step vs
static + activations + workspace. Grid: tiny (width 64) and width-256 predictors, TP 1 and 2 (with and
without SP), Ulysses CP 2, recompute none / selective FFN / full, two sequence lengths, fp32 and bf16.

    python bench/bench_planner.py            # full grid, ~1 min on 2 CPU cores
    python bench/bench_planner.py --quick    # tiny model, no recompute, fp32, TP=1 only (a few seconds)
    python bench/bench_planner.py --json OUT # also write the rows as JSON

On CUDA the grid is a width-1024 model at 2k and 8k video tokens (MiB-sized tiny models would measure the CUDA
libraries' workspaces, not the model), and TP=2 needs two devices (NCCL wants one device per rank).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mindspeed_mm_osp import platform
from mindspeed_mm_osp.testing import run_distributed
from mindspeed_mm_osp.testing.memory import (PLANNER_MODELS, PLANNER_RECOMPUTE, PLANNER_WORKLOADS, planner_grid,
                                             planner_points)
from mindspeed_mm_osp.training.memory_plan import Workload

CUDA_MODELS = {"w1024": dict(PLANNER_MODELS["tiny"], num_heads=8, head_dim=128, caption_channels=256)}
CUDA_WORKLOADS = {"2k": Workload(1, 2, 64, 64, 64), "8k": Workload(1, 8, 64, 64, 64)}


def grid(on_cuda: bool, quick: bool) -> dict:
    if quick:
        return planner_points(["tiny"], ["none"], ["short"], [torch.float32])
    models, workloads = (CUDA_MODELS, CUDA_WORKLOADS) if on_cuda else (PLANNER_MODELS, PLANNER_WORKLOADS)
    dtypes = (torch.bfloat16,) if on_cuda else (torch.float32, torch.bfloat16)
    return planner_points(models, PLANNER_RECOMPUTE, workloads, dtypes, model_table=models, workload_table=workloads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="one grid point on TP=1 (a smoke run)")
    args = parser.parse_args()
    on_cuda = platform.accelerator() == "cuda"  # no CUDA call in this parent: its children fork
    points = grid(on_cuda, args.quick)
    layouts = ((1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False))  # (TP, CP, SP)
    if args.quick or (on_cuda and platform.device_count() < 2):
        layouts = layouts[:1]
    rows, worst = [], 0.0
    print(f"device={platform.accelerator()}; error = predicted / measured - 1 (peak: static + activations + "
          "workspace vs allocated peak of a steady step, accelerators only)")
    print(f"{'point':38s} {'category':12s} {'measured':>12s} {'predicted':>12s} {'error':>8s}")
    for tp, cp, sp in layouts:
        results = run_distributed(planner_grid, tp * cp, points, sp, False, tp=tp, cp=cp, timeout=600)[0]
        for point, cats in results.items():
            for cat, (m, p) in cats.items():
                err = p / m - 1
                worst = max(worst, abs(err))
                label = f"tp{tp}{'+sp' if sp else ''}{f'/cp{cp}' if cp > 1 else ''}/{point}"
                rows.append(dict(point=label, category=cat, measured=m, predicted=p, error=err))
                print(f"{label:38s} {cat:12s} {m:12d} {p:12d} {err:+8.1%}")
    print(f"points: {len(rows)}; worst |error| = {worst:.1%} on {platform.device_name()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "worst_abs_error": worst}, indent=1))


if __name__ == "__main__":
    main()
