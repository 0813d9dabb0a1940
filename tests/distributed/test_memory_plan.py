"""The memory planner against reality: saved-activation bytes (`saved_tensors_hooks`) and the bytes of weights,
main grads and optimizer state after one real step (megatron DDP + our optimizer), on TP=1 and TP=2 (SP) ranks,
for recompute none / selective FFN / full, two sequence lengths, a tiny and a width-256 model, fp32 and bf16.
The planner must be within 15% on every point (bench/bench_planner.py prints the figures)."""

import torch

from mindspeed_mm_osp.testing import run_distributed
from mindspeed_mm_osp.testing.memory import PLANNER_RECOMPUTE, PLANNER_WORKLOADS, planner_grid, planner_points

TOLERANCE = 0.15


def _assert_within(results):
    bad = [f"{point} {cat}: measured {m} predicted {p} ({p / m - 1:+.1%})"
           for point, cats in results.items() for cat, (m, p) in cats.items() if abs(p / m - 1) > TOLERANCE]
    assert not bad, "planner off by more than 15%:\n" + "\n".join(bad)


# A small grid here (each point is a real step); bench/bench_planner.py runs the full one.
def test_planner_within_15_percent_tp1():
    points = (planner_points(["tiny"], PLANNER_RECOMPUTE, PLANNER_WORKLOADS, [torch.float32])
              | planner_points(["w256"], ["selective"], ["long"], [torch.bfloat16])
              | planner_points(["i2v"], ["none"], ["short"], [torch.float32]))
    _assert_within(run_distributed(planner_grid, 1, points, False, False, tp=1)[0])


def test_planner_within_15_percent_tp2_sequence_parallel():
    points = (planner_points(["tiny"], PLANNER_RECOMPUTE, ["short"], [torch.float32])
              | planner_points(["w256"], ["none"], ["long"], [torch.bfloat16]))
    for rank_results in run_distributed(planner_grid, 2, points, True, False, tp=2):
        _assert_within(rank_results)


def test_planner_distributed_optimizer_shards_over_dp():
    points = planner_points(["tiny"], ["none"], ["short"], [torch.bfloat16])
    for rank_results in run_distributed(planner_grid, 2, points, False, True, tp=1):
        _assert_within(rank_results)


def test_planner_within_15_percent_context_parallel():
    points = (planner_points(["tiny"], ["none", "full"], ["short", "long"], [torch.float32])
              | planner_points(["w256"], ["selective"], ["long"], [torch.bfloat16]))
    for rank_results in run_distributed(planner_grid, 2, points, False, False, tp=1, cp=2):
        _assert_within(rank_results)
