"""Adaptive gradient clipping (`--clip_grad_ema_decay`, docs/optimizer.md) and skipping of bad steps.

With norm `g` (global L2, all-reduced, so every rank decides the same), EMA mean `mu` and variance `var`
(decay `gamma`):
* first step: `mu = min(3 g, 1)`, `var = 0`, no clipping;
* `T_clip = mu + 3 sqrt(var)`, `T_ext = max(mu + 5 sqrt(var), 5)`;
* `g <= T_clip`: step; `mu <- gamma mu + (1 - gamma) g`; `var <- gamma var + (1 - gamma) (mu_new - g)^2`;
* `T_clip < g <= T_ext`: scale grads by `1 / (g / T_clip + 1e-6)`, step; statistics unchanged;
* `g > T_ext` or non-finite: **skip** (the reference stepped with the raw grads and saved the corrupted weights:
  docs/reference_bugs.md, `extreme-step-applied`). Weights, EMA, optimizer state and step counters stay untouched.
With `clip_grad_ema_decay <= 0`, Megatron's constant rule: scale by `clip_grad / (g + 1e-6)` when below 1;
non-finite norms are skipped there too. The statistics are checkpointed (docs/reference_bugs.md,
`clip-state-not-checkpointed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

Action = Literal["step", "clip", "skip"]
EXTREME_FLOOR = 5.0


@dataclass(frozen=True)
class ClipDecision:
    action: Action
    grad_norm: float
    threshold: float          # T_clip (inf when nothing clips)
    extreme_threshold: float  # T_ext (inf for the constant rule)
    clip_coef: float          # g / T_clip when clipping, else 1
    scale: float              # factor applied to the grads (1 unless clipping)
    reason: str = ""


@dataclass(frozen=True)
class ClipStepResult:
    update_successful: bool
    grad_norm: Optional[float]             # before clipping (None if the grad scaler found inf first)
    grad_norm_after_clip: Optional[float]  # what was applied (None when skipped)
    decision: Optional[ClipDecision]
    consecutive_skips: int
    stop_training: bool                    # consecutive skips reached max_consecutive_skips


class AdaptiveGradClip:
    def __init__(self, clip_grad: float = 1.0, ema_decay: float = 0.99, max_consecutive_skips: int = 1):
        if ema_decay >= 1.0:
            raise ValueError(f"--clip_grad_ema_decay={ema_decay} must be < 1 (<= 0 selects constant clipping)")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips} must be >= 1")
        self.clip_grad = clip_grad
        self.ema_decay = ema_decay
        self.max_consecutive_skips = max_consecutive_skips
        self.mu = 0.0
        self.var = 0.0
        self.initialized = False
        self.num_updates = 0
        self.consecutive_skips = 0
        self.total_skips = 0

    @property
    def adaptive(self) -> bool:
        return self.clip_grad > 0 and self.ema_decay > 0

    @property
    def should_stop(self) -> bool:
        return self.consecutive_skips >= self.max_consecutive_skips

    def decide(self, grad_norm: float) -> ClipDecision:
        """Decision for this step's global norm; updates the statistics and the skip counters."""
        g = float(grad_norm)
        if not math.isfinite(g):
            return self._skip(g, math.inf, math.inf, "non-finite grad norm")
        if not self.adaptive:
            if self.clip_grad > 0:
                scale = self.clip_grad / (g + 1e-6)
                if scale < 1.0:
                    return self._done(ClipDecision("clip", g, self.clip_grad, math.inf, g / self.clip_grad, scale))
            return self._done(ClipDecision("step", g, self.clip_grad if self.clip_grad > 0 else math.inf,
                                           math.inf, 1.0, 1.0))
        if not self.initialized:
            self.mu, self.var, self.initialized = min(3.0 * g, 1.0), 0.0, True
            return self._done(ClipDecision("step", g, math.inf, math.inf, 1.0, 1.0, "first step"))
        sigma = math.sqrt(self.var)
        t_clip = self.mu + 3.0 * sigma
        t_ext = max(self.mu + 5.0 * sigma, EXTREME_FLOOR)
        if g > t_ext:
            return self._skip(g, t_clip, t_ext, f"extreme grad norm {g:.4g} > {t_ext:.4g}")
        if g > t_clip:
            coef = g / t_clip
            return self._done(ClipDecision("clip", g, t_clip, t_ext, coef, 1.0 / (coef + 1e-6)))
        gamma = self.ema_decay
        self.mu = gamma * self.mu + (1.0 - gamma) * g
        self.var = gamma * self.var + (1.0 - gamma) * (self.mu - g) ** 2
        return self._done(ClipDecision("step", g, t_clip, t_ext, 1.0, 1.0))

    def record_skip(self, reason: str) -> ClipDecision:
        """A skip decided elsewhere (e.g. the grad scaler found inf before any norm)."""
        return self._skip(math.nan, math.inf, math.inf, reason)

    def _skip(self, g: float, t_clip: float, t_ext: float, reason: str) -> ClipDecision:
        self.consecutive_skips += 1
        self.total_skips += 1
        return ClipDecision("skip", g, t_clip, t_ext, 1.0, 1.0, reason)

    def _done(self, decision: ClipDecision) -> ClipDecision:
        self.consecutive_skips = 0
        self.num_updates += 1
        return decision

    def state_dict(self) -> dict:
        return {"mu": self.mu, "var": self.var, "initialized": self.initialized, "num_updates": self.num_updates,
                "consecutive_skips": self.consecutive_skips, "total_skips": self.total_skips,
                "clip_grad": self.clip_grad, "ema_decay": self.ema_decay}

    def load_state_dict(self, state: dict) -> None:
        """Restores the statistics; `clip_grad`/`ema_decay` stay as configured for this run."""
        self.mu, self.var = float(state["mu"]), float(state["var"])
        self.initialized = bool(state["initialized"])
        self.num_updates = int(state["num_updates"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.total_skips = int(state["total_skips"])


def clip_and_step(optimizer, clipper: AdaptiveGradClip) -> ClipStepResult:
    """Replacement for megatron `optimizer.step()` (docs/optimizer.md): prepare grads, one all-reduced norm,
    then skip / clip / step. Advance the LR scheduler only when `update_successful`."""

    def result(ok: bool, g, after, decision) -> ClipStepResult:
        return ClipStepResult(ok, g, after, decision, clipper.consecutive_skips, clipper.should_stop)

    if optimizer.prepare_grads():  # only with a grad scaler: it found inf/nan
        return result(False, None, None, clipper.record_skip("grad scaler found inf"))
    g = optimizer.get_grad_norm()
    decision = clipper.decide(g)
    if decision.action == "skip":
        return result(False, g, None, decision)
    if decision.action == "clip":
        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            if getattr(sub, "is_stub_optimizer", False):
                continue
            decoupled = getattr(sub.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
            grads = [(p.decoupled_grad if decoupled else p.grad) for p in sub.get_parameters()]
            grads = [gr for gr in grads if gr is not None]
            if grads:
                torch._foreach_mul_(grads, decision.scale)
    ok = optimizer.step_with_ready_grads()
    return result(ok, g, g * decision.scale, decision)
