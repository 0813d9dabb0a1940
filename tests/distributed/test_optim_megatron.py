"""FusedEmaAdamW inside megatron's optimizers (FP32 / Float16 / Distributed), and the skip path.

The reference in every rank is a plain copy of the model trained on the full global batch with
`torch.optim.AdamW` and an explicit EMA; the megatron run splits the batch over DP.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mindspeed_mm_osp.optim import (
    AdaptiveGradClip,
    EMA_KEY,
    OptimizerSettings,
    build_lr_scheduler,
    build_optimizer,
    clip_and_step,
    ema_state_dict,
    gather_model_space,
)
from mindspeed_mm_osp.testing import run_distributed
from helpers import EMA_DECAY, batch, loss_fn, make_model, settings, train_step


class ReferenceRun:
    """torch AdamW with megatron's param groups (no decay on biases / 1-D params) plus an explicit EMA."""

    def __init__(self, model: nn.Module, s: OptimizerSettings, fused: bool = False):
        decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or p.ndim == 1)]
        no_decay = [p for n, p in model.named_parameters() if n.endswith(".bias") or p.ndim == 1]
        self.model = model
        self.opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=s.lr,
                                     betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_eps, weight_decay=s.weight_decay,
                                     fused=fused)  # the same kernel: Adam turns rounding noise of ~0 grads into O(lr)
        self.ema = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.n = 0

    def step(self, step: int, world_size: int) -> None:
        """Grads as megatron DDP forms them: each DP slice's grad scaled by 1/DP, then summed."""
        grads = []
        for r in range(world_size):
            self.opt.zero_grad()
            loss_fn(self.model(batch(step, r, world_size))).backward()
            grads.append([p.grad * (1.0 / world_size) for p in self.model.parameters()])
        for p, *gs in zip(self.model.parameters(), *grads):
            p.grad = sum(gs[1:], gs[0])
        self.opt.step()
        self.n += 1
        d = min(EMA_DECAY, (1 + self.n) / (10 + self.n))
        for n, p in self.model.named_parameters():
            self.ema[n].mul_(d).add_(p.detach(), alpha=1 - d)


def _matches_reference(rank, world_size, use_dist, fused):
    model, ref_module = make_model(use_distributed_optimizer=use_dist)
    opt = build_optimizer(model, settings(use_distributed_optimizer=use_dist, fused=fused))
    ref = ReferenceRun(ref_module, settings(), fused=fused)
    clip = AdaptiveGradClip(clip_grad=0.0, ema_decay=0.0)
    for step in range(6):
        result = train_step(model, opt, clip, step, rank, world_size)
        assert result.update_successful
        ref.step(step, world_size)
    inner = opt.chained_optimizers[0].optimizer
    shard_info = [(tuple(p.shape), tuple(inner.state[p][EMA_KEY].shape), inner.state[p][EMA_KEY].dtype,
                   float(inner.state[p]["step"])) for g in inner.param_groups for p in g["params"]]
    space = gather_model_space(model, opt)
    ema = ema_state_dict(model, opt)
    params = {n: p.detach().float() for n, p in model.module.named_parameters()}
    ref_params = {n: p.detach() for n, p in ref.model.named_parameters()}
    return params, ref_params, ema, ref.ema, space, shard_info, type(opt.chained_optimizers[0]).__name__


@pytest.mark.parametrize("world_size,use_dist,fused", [(1, False, False), (2, False, True), (2, True, False),
                                                       (2, True, True)])
def test_megatron_matches_single_process_adamw_plus_ema(world_size, use_dist, fused):
    results = run_distributed(_matches_reference, world_size, use_dist, fused, tp=1)
    for params, ref_params, ema, ref_ema, space, shard_info, wrapper in results:
        assert wrapper == ("DistributedOptimizer" if use_dist else "FP32Optimizer")
        assert set(ema) == set(ref_ema) == set(params)
        for name in params:
            torch.testing.assert_close(params[name], ref_params[name], rtol=0, atol=1e-6)
            torch.testing.assert_close(ema[name], ref_ema[name], rtol=0, atol=1e-6)
            torch.testing.assert_close(space[name]["param"], ref_params[name], rtol=0, atol=1e-6)
            assert space[name]["step"] == 6.0
        for shape, ema_shape, dtype, step in shard_info:
            assert shape == ema_shape and dtype == torch.float32 and step == 6.0
    if use_dist:
        # Each rank owns a shard; together they cover every element exactly once.
        total = sum(p.numel() for p in results[0][0].values())
        owned = [sum(int(torch.tensor(s[0]).prod()) for s in r[5]) for r in results]
        assert sum(owned) == total and all(0 < o < total for o in owned)


def _bf16_runs(rank, world_size, use_dist):
    model, _ = make_model(bf16=True, use_distributed_optimizer=use_dist)
    opt = build_optimizer(model, settings(bf16=True, use_distributed_optimizer=use_dist))
    clip = AdaptiveGradClip(clip_grad=1.0, ema_decay=0.99)
    for step in range(3):
        assert train_step(model, opt, clip, step, rank, world_size).update_successful
    sub = opt.chained_optimizers[0]
    inner = sub.optimizer
    assert type(inner).__name__ == "FusedEmaAdamW"
    for g in inner.param_groups:
        for p in g["params"]:
            assert p.dtype == torch.float32 and inner.state[p][EMA_KEY].dtype == torch.float32
    space = gather_model_space(model, opt)
    for name, p in model.module.named_parameters():
        # bf16 model weight == rounded fp32 master
        assert torch.equal(p.detach(), space[name]["param"].to(torch.bfloat16)), name
    return type(sub).__name__


@pytest.mark.parametrize("use_dist", [False, True])
def test_bf16_master_and_ema_are_fp32(use_dist):
    names = run_distributed(_bf16_runs, 2, use_dist, tp=1)
    assert names == ["DistributedOptimizer" if use_dist else "Float16OptimizerWithFloat16Params"] * 2


def _snapshot(model, opt):
    inner = opt.chained_optimizers[0].optimizer
    state = {id(p): {k: v.clone() for k, v in inner.state[p].items()} for g in inner.param_groups
             for p in g["params"]}
    return [p.detach().clone() for p in model.parameters()], state


def _nan_on_one_rank(rank, world_size, use_dist):
    model, _ = make_model(use_distributed_optimizer=use_dist)
    opt = build_optimizer(model, settings(use_distributed_optimizer=use_dist))
    sched = build_lr_scheduler(opt, settings(lr_warmup_iters=3, lr_decay_style="cosine"))
    clip = AdaptiveGradClip(clip_grad=1.0, ema_decay=0.99, max_consecutive_skips=2)
    for step in range(2):
        assert train_step(model, opt, clip, step, rank, world_size).update_successful
        sched.step(1)
    params, state = _snapshot(model, opt)
    clip_before = clip.state_dict()
    result = train_step(model, opt, clip, 2, rank, world_size, poison=(rank == 1))
    assert not result.update_successful and result.decision.action == "skip"
    assert result.consecutive_skips == 1 and not result.stop_training
    params_after, state_after = _snapshot(model, opt)
    for a, b in zip(params, params_after):
        assert torch.equal(a, b)
    for key, st in state.items():
        for k, v in st.items():
            assert torch.equal(v, state_after[key][k]), k
    assert {k: v for k, v in clip.state_dict().items() if "skips" not in k} == \
        {k: v for k, v in clip_before.items() if "skips" not in k}
    # a second bad step in a row asks the trainer to stop; a good one resets the count
    assert train_step(model, opt, clip, 2, rank, world_size, poison=(rank == 1)).stop_training
    good = train_step(model, opt, clip, 3, rank, world_size)
    assert good.update_successful and good.consecutive_skips == 0
    return [float(v["step"]) for v in state_after.values()]


@pytest.mark.parametrize("use_dist", [False, True])
def test_nan_grad_on_one_rank_skips_everything(use_dist):
    for steps in run_distributed(_nan_on_one_rank, 2, use_dist, tp=1):
        assert steps and all(s == 2.0 for s in steps)


def _clip_scales_grads(rank, world_size):
    model, _ = make_model(use_distributed_optimizer=True)
    opt = build_optimizer(model, settings(use_distributed_optimizer=True))
    clip = AdaptiveGradClip(clip_grad=1.0, ema_decay=0.99)
    clip.load_state_dict({**clip.state_dict(), "mu": 1e-3, "var": 0.0, "initialized": True})
    from megatron.core.distributed import finalize_model_grads

    model.zero_grad_buffer()
    opt.zero_grad()
    loss_fn(model(batch(0, rank, world_size))).backward()
    finalize_model_grads([model])
    result = clip_and_step(opt, clip)
    return result.decision.action, result.grad_norm, result.grad_norm_after_clip, result.decision.threshold


def test_adaptive_clip_through_distributed_optimizer():
    results = run_distributed(_clip_scales_grads, 2, tp=1)
    action, g, after, threshold = results[0]
    assert results[0] == results[1]  # all ranks decide identically from the all-reduced norm
    assert action == "clip" and g > threshold and after == pytest.approx(threshold, rel=1e-5)


def _lr_schedule(rank, world_size, style):
    s = settings(lr=1.0, min_lr=0.1, lr_warmup_iters=2, lr_decay_iters=10, lr_decay_style=style)
    opt = build_optimizer(make_model()[0], s)  # megatron keeps max_lr/min_lr per param group, from these settings
    sched = build_lr_scheduler(opt, s)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(1)
    other = build_lr_scheduler(build_optimizer(make_model()[0], s), s)
    other.load_state_dict(sched.state_dict())
    return lrs, other.num_steps


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_lr_schedule_megatron_semantics(style):
    import math

    lrs, restored_steps = run_distributed(_lr_schedule, 1, style, tp=1)[0]
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])  # linear warm-up from --lr-warmup-init 0 over 2 iters
    if style == "constant":
        assert lrs[2:] == pytest.approx([1.0] * 10)
    elif style == "linear":
        assert lrs[6] == pytest.approx(0.1 + 0.9 * (1 - 4 / 8))
    else:
        assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 4 / 8) + 1))
    if style != "constant":
        assert lrs[10:] == pytest.approx([0.1, 0.1])  # --min-lr after --lr-decay-iters
    assert restored_steps == 12
