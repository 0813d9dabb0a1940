"""AdamW that also keeps an fp32 EMA of the updated weights as optimizer state (docs/optimizer.md).

Per step, for every fp32 param `p` with a gradient (exactly `torch.optim.AdamW`, then the EMA):

    n = state["step"] (after the increment);  d = min(ema_decay, (1 + n) / (10 + n))
    p <- p * (1 - lr * wd);  m <- lerp(m, g, 1 - b1);  v <- b2 * v + (1 - b2) * g^2
    p <- p - lr / (1 - b1^n) * m / (sqrt(v / (1 - b2^n)) + eps)
    s <- lerp(s, p, 1 - d)           # s = state["ema_params"], initialised to p *before* its first update

Differences from the reference (MindSpeed `FusedEmaAdamW`), on purpose:
* the warm-up counter `n` is each param's own `step` (saved with the optimizer state), not a Python attribute
  reset on every restart (docs/reference_bugs.md, `ema-warmup-reset-on-restart`); with all params stepped every
  iteration it equals the
  reference's `num_updates` in an uninterrupted run;
* `step` is a per-param tensor in torch's layout (CPU float32 scalar; on the param's device when `fused`), so
  torch's and megatron's state handling applies unchanged.

Kernels: MindSpeed's fused op on Ascend (call signature in docs/optimizer.md; not run in CI, which has no
Ascend); torch's fused AdamW kernel plus one `_foreach_lerp_` when `fused=True` (default on CUDA and CPU:
~3x faster than foreach on CPU, see bench/bench_ema_optimizer.py; 10 x 4 bytes/param against the 9 x 4 floor);
otherwise a multi-tensor `torch._foreach_*` sequence per (device, dtype), op for op torch's foreach AdamW.
The two torch kernels agree to rounding, which Adam can amplify for near-zero gradients: compare runs
with the same kernel.
The class subclasses `torch.optim.AdamW` so megatron's DistributedOptimizer accepts it as inner optimizer.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .. import platform

EMA_KEY = "ema_params"


def ema_decay_at(step: float, ema_decay: float) -> float:
    """Warm-up law of the reference: `min(ema_decay, (1 + n) / (10 + n))` for the n-th update (n >= 1)."""
    return min(ema_decay, (1.0 + step) / (10.0 + step))


class FusedEmaAdamW(torch.optim.AdamW):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, ema_decay: float = 0.9999,
                 fused: Optional[bool] = None):
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay={ema_decay} must lie in [0, 1]")
        if fused is None:  # torch's fused kernel exists for CUDA and CPU; Ascend uses MindSpeed's op
            fused = platform.accelerator() in ("cuda", "cpu")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        # Kept per group so it is saved and restored with `param_groups`.
        self.defaults["ema_decay"] = ema_decay
        for group in self.param_groups:
            group.setdefault("ema_decay", ema_decay)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("ema_decay", self.defaults.get("ema_decay", 0.9999))

    @staticmethod
    def new_step_tensor(group: dict, param: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """A `step` tensor placed as torch's AdamW places it (param device when fused, else CPU)."""
        if group.get("fused") or group.get("capturable"):
            return torch.tensor(float(value), dtype=torch.float32, device=param.device)
        return torch.tensor(float(value), dtype=torch.float32)

    def _collect(self, group: dict):
        params, grads, exp_avgs, exp_avg_sqs, emas, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("FusedEmaAdamW does not support sparse gradients")
            if p.dtype != torch.float32:
                raise TypeError(f"FusedEmaAdamW steps fp32 (master) params only, got {p.dtype}; "
                                "wrap bf16 models in megatron's mixed-precision or distributed optimizer")
            state = self.state[p]
            if not state:
                state["step"] = self.new_step_tensor(group, p)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if EMA_KEY not in state:  # also after loading a plain-AdamW state: EMA starts from the weights
                state[EMA_KEY] = p.detach().clone(memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype))
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            emas.append(state[EMA_KEY])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, emas, steps

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        npu_kernel = platform.npu_fused_ema_adamw()
        for group in self.param_groups:
            tensors = self._collect(group)
            if not tensors[0]:
                continue
            if npu_kernel is not None:
                _npu_step(npu_kernel, group, *tensors)
                continue
            grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype([list(t) for t in tensors])
            for (params, grads, exp_avgs, exp_avg_sqs, emas, steps), _ in grouped.values():
                if group["fused"]:
                    _fused_step(group, params, grads, exp_avgs, exp_avg_sqs, emas, steps)
                else:
                    _foreach_step(group, params, grads, exp_avgs, exp_avg_sqs, emas, steps)
        return loss


def _lerp_ema(group: dict, emas: list, params: list, step_values: list[float]) -> None:
    weights = [1.0 - ema_decay_at(n, group["ema_decay"]) for n in step_values]
    torch._foreach_lerp_(emas, params, weights)


def _foreach_step(group: dict, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
                  emas: list, steps: list) -> None:
    """torch's `_multi_tensor_adam` (AdamW, non-capturable) op for op, then the EMA lerp."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    torch._foreach_add_(steps, 1)
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_values = [s.item() for s in steps]
    step_size = [(lr / (1 - beta1 ** n)) * -1 for n in step_values]
    bias_correction2_sqrt = [(1 - beta2 ** n) ** 0.5 for n in step_values]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
    del denom
    _lerp_ema(group, emas, params, step_values)


def _fused_step(group: dict, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
                emas: list, steps: list) -> None:
    """torch's fused AdamW kernel (one pass over p, g, m, v) plus one EMA pass."""
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                        weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False)
    # One host sync per (group, device) to read the step counts for the warm-up law.
    _lerp_ema(group, emas, params, torch.stack(steps).tolist())


def _npu_step(kernel, group: dict, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
              emas: list, steps: list) -> None:
    """MindSpeed `npu_apply_fused_ema_adamw`: one kernel per tensor updating p, m, v, s (docs/optimizer.md)."""
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    for p, g, m, v, s, st in zip(params, grads, exp_avgs, exp_avg_sqs, emas, steps):
        n = st.item()
        step = torch.tensor([int(n)], dtype=torch.int64, device=p.device)
        out = kernel(g, p, m, v, s, step, group["lr"], ema_decay_at(n, group["ema_decay"]), beta1, beta2,
                     group["eps"], 1, True, group["weight_decay"])
        for dst, src in zip((p, m, v, s), out):
            if src is not dst:
                dst.copy_(src)
