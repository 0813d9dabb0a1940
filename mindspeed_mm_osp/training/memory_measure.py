"""What a training step really keeps in memory, measured on any device (the planner's ground truth).

* activations: bytes of the distinct storages autograd packs for backward during a forward
  (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded; on CPU this is what stays alive until
  backward, on an accelerator the peak allocated memory adds the transient workspace on top;
* static: model weights, megatron DDP's main-grad buffers and every tensor the optimizer owns (fp32 master
  copies, Adam moments, EMA), each storage counted once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class SavedTensorBytes:
    """Sum of distinct storages packed for backward inside `with counter.record():`, ignoring parameters."""

    def __init__(self, model: nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @contextlib.contextmanager
    def record(self) -> Iterator["SavedTensorBytes"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
            if isinstance(t, torch.Tensor)}


def static_bytes_measured(model: nn.Module, optimizer=None) -> dict[str, int]:
    """{'weights', 'grads', 'optimizer'} bytes of a (megatron-DDP wrapped) model and megatron optimizer.

    Grads are the `main_grad` buffers megatron DDP allocates (or plain `.grad`); optimizer bytes are the state
    tensors and main (master) params of every inner optimizer that are not model weights themselves."""
    params = list(model.parameters())
    weights = _storages(params)
    grads = _storages([getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad
                       for p in params])
    owned: dict[int, int] = {}
    subs = getattr(optimizer, "chained_optimizers", [optimizer]) if optimizer is not None else []
    for sub in subs:
        inner = getattr(sub, "optimizer", sub)
        if inner is None:
            continue
        for group in inner.param_groups:
            owned.update(_storages(group["params"]))
        for state in inner.state.values():
            owned.update(_storages(state.values()))
    opt = {ptr: n for ptr, n in owned.items() if ptr not in weights and ptr not in grads}
    return {"weights": sum(weights.values()), "grads": sum(grads.values()), "optimizer": sum(opt.values())}


def measure_predictor_step(cfg, work, recompute, act_dtype: torch.dtype, sequence_parallel: bool = False,
                           distributed_optimizer: bool = False, seed: int = 0) -> dict[str, int]:
    """One training step of SparseUMMDiT under megatron DDP and our optimizer on this rank's device (megatron
    groups already initialised, e.g. by `testing.run_distributed`): saved-activation bytes of the forward, then
    the static bytes after one optimizer step (when all optimizer state exists). `cfg`, `work` and
    `recompute` are the planner's inputs (PredictorConfig, memory_plan.Workload, RecomputeConfig)."""
    from .. import platform
    from ..models.predictor import SparseUMMDiT
    from ..optim.megatron import OptimizerSettings, build_optimizer
    from .args import ParallelArgs
    from .components import wrap_ddp

    torch.manual_seed(seed)
    device = platform.device()
    with device:  # initialised where it runs
        model = SparseUMMDiT(cfg, sequence_parallel=sequence_parallel, recompute=recompute, params_dtype=act_dtype)
    model.train()
    ddp = wrap_ddp(model, ParallelArgs(use_distributed_optimizer=distributed_optimizer))
    settings = OptimizerSettings(lr=1e-4, bf16=act_dtype == torch.bfloat16,
                                 use_distributed_optimizer=distributed_optimizer)
    optimizer = build_optimizer(ddp, settings)
    b = work.micro_batch
    latent = torch.randn(b, cfg.patch_embed_channels, work.latent_frames, work.latent_height, work.latent_width,
                         device=device)
    text = torch.randn(b, work.text_len, cfg.caption_channels, device=device, dtype=act_dtype)
    pooled = torch.randn(b, cfg.pooled_projection_dim, device=device)
    timestep = torch.rand(b, device=device) * 1000
    counter = SavedTensorBytes(model)
    with counter.record():
        out = ddp(latent, timestep, text, None, None, pooled)
    out.float().square().mean().backward()
    optimizer.step()
    peak = 0
    if platform.accelerator() != "cpu":  # a second step with all optimizer state allocated: the steady peak
        del out
        platform.synchronize()
        platform.reset_peak_memory_stats()
        ddp(latent, timestep, text, None, None, pooled).float().square().mean().backward()
        optimizer.step()
        platform.synchronize()
        peak = platform.max_memory_allocated()
    return {"activations": counter.total, "peak": peak, **static_bytes_measured(ddp, optimizer)}


def planner_error(cfg, work, recompute, act_dtype: torch.dtype, sequence_parallel: bool = False,
                  distributed_optimizer: bool = False) -> dict[str, tuple[int, int]]:
    """{category: (measured, predicted)} for this rank: `measure_predictor_step` against `plan_memory` with the
    parallel sizes of the initialised megatron groups."""
    from ..parallel import ParallelDims
    from .memory_plan import OptimizerPlan, Parallel, plan_memory

    measured = measure_predictor_step(cfg, work, recompute, act_dtype, sequence_parallel, distributed_optimizer)
    dims = ParallelDims.current()
    par = Parallel(tp=dims.tp, cp=dims.cp, dp=dims.dp, sequence_parallel=sequence_parallel)
    plan = plan_memory(cfg, work, par, recompute, act_dtype, OptimizerPlan(distributed=distributed_optimizer))
    predicted = {"activations": plan.activations, "weights": plan.weights, "grads": plan.grads,
                 "optimizer": plan.optimizer}
    if measured["peak"]:  # accelerator: allocated peak vs static + saved + workspace (inputs are tiny)
        predicted["peak"] = plan.static + plan.activations + plan.workspace
    return {k: (measured[k], predicted[k]) for k in predicted}


__all__ = ["SavedTensorBytes", "measure_predictor_step", "planner_error", "static_bytes_measured"]
