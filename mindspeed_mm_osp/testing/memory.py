"""The memory planner's accuracy grid, shared by its test (a subset) and `bench/bench_planner.py` (all of it)."""

from __future__ import annotations

from ..config.predictor import RecomputeConfig
from ..training.memory_plan import Workload
from .tiny import TINY_PREDICTOR, tiny_predictor_config

_PLANNER_TINY = dict(TINY_PREDICTOR, num_layers=[1, 2, 1])
PLANNER_MODELS = {
    "tiny": _PLANNER_TINY,
    "w256": dict(_PLANNER_TINY, num_layers=[1, 1, 1], head_dim=64),  # hidden 256
    "i2v": dict(_PLANNER_TINY, model_id="SparseUMMDiTInpaint", vae_scale_factor_t=8),  # wider patch embedding input
}
PLANNER_RECOMPUTE = {"none": RecomputeConfig(), "selective": RecomputeConfig(selective_ffn_layers=4),
                     "full": RecomputeConfig(granularity="full", method="block", num_layers=4)}
PLANNER_WORKLOADS = {"short": Workload(2, 2, 8, 8, 5), "long": Workload(1, 3, 12, 16, 7)}


def planner_points(models, recomputes, workloads, dtypes, *, model_table: dict = PLANNER_MODELS,
                   workload_table: dict = PLANNER_WORKLOADS) -> dict:
    """Named grid points "model/recompute/workload/dtype" -> (config, workload, recompute, activation dtype)."""
    return {f"{m}/{r}/{w}/{str(d)[6:]}": (tiny_predictor_config(model_table[m]), workload_table[w],
                                          PLANNER_RECOMPUTE[r], d)
            for m in models for r in recomputes for w in workloads for d in dtypes}


def planner_grid(rank: int, world: int, points: dict, sequence_parallel: bool, distributed_optimizer: bool) -> dict:
    """Per point, `planner_error`'s (measured, predicted) bytes per category, on this rank (a `run_distributed`
    target)."""
    from ..training.memory_measure import planner_error

    return {name: planner_error(cfg, work, recompute, dtype, sequence_parallel, distributed_optimizer)
            for name, (cfg, work, recompute, dtype) in points.items()}


__all__ = ["PLANNER_MODELS", "PLANNER_RECOMPUTE", "PLANNER_WORKLOADS", "planner_grid", "planner_points"]
