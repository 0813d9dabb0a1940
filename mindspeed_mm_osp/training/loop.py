"""What the training loops share (`Trainer` for the predictor, `VAETrainer` for the autoencoder): one `TrainState`,
the step outcome, and the rules around a step: the gradient reduce with fault injection, counting skipped steps,
and what happens at the end of an iteration (save on `--save-interval`, exit rules, the stop after too many skipped
steps with the last good state saved)."""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..optim import ClipStepResult
from ..parallel import ParallelDims

logger = logging.getLogger("mindspeed_mm_osp.train")


RECENT_LOSSES = 10_000  # a run of 1e8 iterations must not keep every loss in memory


class TrainingStopped(RuntimeError):
    """Training stopped on purpose after saving (too many skipped steps)."""


@dataclass
class TrainResult:
    iteration: int
    consumed_train_samples: int
    losses: list[float]  # per iteration of this run, the last RECENT_LOSSES at most
    skipped_iterations: int
    stop_reason: str
    validation: dict[int, float] = field(default_factory=dict)  # iteration -> validation loss of this run


@dataclass
class TrainState:
    """What changes while training: the position a checkpoint restores, and this run's counters."""

    iteration: int = 0
    consumed_samples: int = 0
    last_saved: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    stop_reason: str = "train_iters reached"
    losses: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT_LOSSES))
    validation: dict[int, float] = field(default_factory=dict)  # iteration -> validation loss of this run


@dataclass
class StepOutcome:
    """One optimizer step: DP-mean loss, the clip/step decision, predictor FLOPs and wall time."""

    loss: float
    clip: ClipStepResult
    flops: float
    elapsed_s: float


def inject_fault(ddp, kind: str) -> None:
    """A non-finite value in the first gradient (`--inject-nonfinite-grad`, for the reliability tests)."""
    value = float("nan") if kind == "nan" else float("inf")
    for p in ddp.module.parameters():
        if p.requires_grad and getattr(p, "main_grad", None) is not None:
            p.main_grad.view(-1)[0] = value
            return


def dp_mean(value: torch.Tensor, dims: ParallelDims) -> float:
    """The mean of a per-replica scalar over the DP group."""
    value = value.detach().float().reshape(1).clone()
    dist.all_reduce(value, group=dims.dp_group)
    return float(value) / dims.dp


class LoopRules:
    """The per-iteration rules of a loop; the loop provides `args`, `state`, `ddp`, `faults`, `rank`, `start_time`,
    `async_saves` (None without --async-save) and `save(wait=False)`."""

    def _finalize_gradients(self) -> None:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp])
        fault = self.faults.get(self.state.iteration + 1)
        if fault is not None:
            inject_fault(self.ddp, fault)
            if self.rank == 0:
                logger.warning("fault injection: %s gradient at iteration %d", fault, self.state.iteration + 1)

    def _count_skip(self, result: ClipStepResult) -> None:
        self.state.skipped_iterations += 1
        if result.grad_norm is None or not math.isfinite(result.grad_norm):
            self.state.nan_iterations += 1
        if self.rank == 0:
            logger.warning("iteration %d skipped: %s (grad norm %s)", self.state.iteration + 1,
                           result.decision.reason if result.decision else "non-finite gradients", result.grad_norm)

    def should_stop(self, step: StepOutcome) -> Optional[str]:
        """Why to stop after this iteration (None: go on); saves on `--save-interval`.

        Raises TrainingStopped, after saving the last good state, when too many steps in a row were skipped.
        """
        args, it = self.args, self.state.iteration
        if self.async_saves is not None:
            self.async_saves.maybe_finalize()  # publish a background save once every rank has written it
        if step.clip.stop_training:
            self.save(wait=True)
            raise TrainingStopped(
                f"{step.clip.consecutive_skips} consecutive iterations skipped for non-finite or extreme gradients "
                f"(limit --max-consecutive-skips={args.max_consecutive_skips}); the last good state was saved at "
                f"iteration {it} in {args.save}. Inspect the data and the learning rate, then resume.")
        if args.save_interval and it % args.save_interval == 0:
            self.save()
        if args.exit_interval and it % args.exit_interval == 0:
            return "exit interval"
        if args.exit_duration_in_mins and (time.monotonic() - self.start_time) / 60 > args.exit_duration_in_mins:
            return "exit duration"
        return None
