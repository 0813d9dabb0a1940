"""The memory planner against reality: saved-activation bytes (`saved_tensors_hooks`) and the bytes of weights,
main grads and optimizer state after one real step (megatron DDP + our optimizer), on TP=1 and TP=2 (SP) ranks,
for recompute none / selective FFN / full, two sequence lengths, a tiny and a width-256 model, fp32 and bf16.
The planner must be within 15% on every point (bench/bench_planner.py prints the figures)."""

import torch

from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig, RecomputeConfig
from mindspeed_mm_osp.testing import run_distributed
from mindspeed_mm_osp.training.memory_measure import planner_error
from mindspeed_mm_osp.training.memory_plan import Workload

TOLERANCE = 0.15
TINY = dict(num_layers=[1, 2, 1], sparse_n=[1, 2, 1], num_heads=4, head_dim=16, in_channels=4,
            timestep_embed_dim=32, caption_channels=24, pooled_projection_dim=16)
WIDE = dict(TINY, num_layers=[1, 1, 1], head_dim=64)  # hidden 256
I2V = dict(TINY, model_id="SparseUMMDiTInpaint", vae_scale_factor_t=8)  # wider patch embedding input
MODELS = {"tiny": TINY, "w256": WIDE, "i2v": I2V}
RECOMPUTE = {"none": RecomputeConfig(), "selective": RecomputeConfig(selective_ffn_layers=4),
             "full": RecomputeConfig(granularity="full", method="block", num_layers=4)}
WORKLOADS = {"short": Workload(2, 2, 8, 8, 5), "long": Workload(1, 3, 12, 16, 7)}


def _grid(rank, world, points, sequence_parallel, distributed_optimizer):
    out = {}
    for name, (cfg, work, recompute, dtype) in points.items():
        out[name] = planner_error(cfg, work, recompute, dtype, sequence_parallel, distributed_optimizer)
    return out


def _points(models, recomputes, workloads, dtypes):
    return {f"{m}/{r}/{w}/{str(d)[6:]}": (from_dict(PredictorConfig, MODELS[m]), WORKLOADS[w], RECOMPUTE[r], d)
            for m in models for r in recomputes for w in workloads for d in dtypes}


def _assert_within(results):
    bad = [f"{point} {cat}: measured {m} predicted {p} ({p / m - 1:+.1%})"
           for point, cats in results.items() for cat, (m, p) in cats.items() if abs(p / m - 1) > TOLERANCE]
    assert not bad, "planner off by more than 15%:\n" + "\n".join(bad)


# A small grid here (each point is a real step); bench/bench_planner.py runs the full one.
def test_planner_within_15_percent_tp1():
    points = (_points(["tiny"], RECOMPUTE, WORKLOADS, [torch.float32])
              | _points(["w256"], ["selective"], ["long"], [torch.bfloat16])
              | _points(["i2v"], ["none"], ["short"], [torch.float32]))
    _assert_within(run_distributed(_grid, 1, points, False, False, tp=1)[0])


def test_planner_within_15_percent_tp2_sequence_parallel():
    points = (_points(["tiny"], RECOMPUTE, ["short"], [torch.float32])
              | _points(["w256"], ["none"], ["long"], [torch.bfloat16]))
    for rank_results in run_distributed(_grid, 2, points, True, False, tp=2):
        _assert_within(rank_results)


def test_planner_distributed_optimizer_shards_over_dp():
    points = _points(["tiny"], ["none"], ["short"], [torch.bfloat16])
    for rank_results in run_distributed(_grid, 2, points, False, True, tp=1):
        _assert_within(rank_results)


def test_planner_within_15_percent_context_parallel():
    points = (_points(["tiny"], ["none", "full"], ["short", "long"], [torch.float32])
              | _points(["w256"], ["selective"], ["long"], [torch.bfloat16]))
    for rank_results in run_distributed(_grid, 2, points, False, False, tp=1, cp=2):
        _assert_within(rank_results)
