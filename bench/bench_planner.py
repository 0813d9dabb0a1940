"""The memory planner against reality on the full accuracy grid (the test runs a subset).

Per point: saved-activation bytes (`saved_tensors_hooks`, storages deduplicated) and the weights / fp32 main
grads / optimizer-state bytes after one real step (megatron DDP + FusedEmaAdamW), measured vs
`training.memory_plan.plan_memory`; on an accelerator also the allocated peak of a steady step vs
static + activations + workspace. Grid: tiny (width 64) and width-256 predictors, TP 1 and 2 (with and
without SP), recompute none / selective FFN / full, two sequence lengths, fp32 and bf16.

    python bench/bench_planner.py            # full grid, ~2 min on 2 CPU cores
    python bench/bench_planner.py --json OUT # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))
from test_memory_plan import MODELS, RECOMPUTE, WORKLOADS, _grid, _points  # noqa: E402

from mindspeed_mm_osp import platform  # noqa: E402
from mindspeed_mm_osp.testing import run_distributed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    points = _points(list(MODELS), list(RECOMPUTE), list(WORKLOADS), [torch.float32, torch.bfloat16])
    rows, worst = [], 0.0
    print(f"device={platform.accelerator()} ({platform.device_name()}); error = predicted / measured - 1")
    print(f"{'point':38s} {'category':12s} {'measured':>12s} {'predicted':>12s} {'error':>8s}")
    for tp, sp in ((1, False), (2, False), (2, True)):
        results = run_distributed(_grid, tp, points, sp, False, tp=tp, timeout=600)[0]
        for point, cats in results.items():
            for cat, (m, p) in cats.items():
                err = p / m - 1
                worst = max(worst, abs(err))
                label = f"tp{tp}{'+sp' if sp else ''}/{point}"
                rows.append(dict(point=label, category=cat, measured=m, predicted=p, error=err))
                print(f"{label:38s} {cat:12s} {m:12d} {p:12d} {err:+8.1%}")
    print(f"points: {len(rows)}; worst |error| = {worst:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "worst_abs_error": worst}, indent=1))


if __name__ == "__main__":
    main()
