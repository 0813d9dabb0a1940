"""TeaCache-style step caching for SparseUMMDiT sampling (Liu et al. 2024, "Timestep Embedding Tells: It's Time
to Cache for Video Diffusion Model").

Per step the cheap part of the model runs (embeddings, patchify and the first block's timestep modulation
`norm1`); the relative L1 change of that modulated video input against the previous step,
`sum|m_i - m_{i-1}| / sum|m_{i-1}|`, is accumulated. While the sum stays under `threshold` the block stack is
skipped and its last *residual* (stack output - stack input, in fp32) is added to the current input instead;
the output head then still runs with the current timestep's modulation. Reusing the residual, not the last
velocity, keeps the current input and the current timestep in the prediction: only the blocks' update is
stale. When the sum reaches the threshold the stack runs, the residual is refreshed and the sum restarts.
The first and the last step always run, also when sampling starts part-way down the schedule (`first_step`,
video editing): steps are counted as schedule steps, from `first_step` to `num_steps - 1`.

No rescaling polynomial: TeaCache's fitted coefficients belong to other models (HunyuanVideo, Wan, ...) and
none was fitted for SparseUMMDiT, so the raw relative change is used (identity rescale), and the threshold is
on that scale.

Decisions are deterministic and shared by everything that forms one prediction: the cond and uncond halves of
a batched CFG forward (sums over the whole batch), the two ranks of a CFG-parallel pair (`group`: the sums are
all-reduced) and TP/CP peers (the modulated input is computed on the full, unsharded sequence, identically on
every one of them). `threshold=0` never skips and is bit-identical to the plain forward.
"""

from __future__ import annotations

from typing import Optional

import torch


class StepCache:
    """A `model_fn` for `diffusion.sample` around a SparseUMMDiT; one instance per sampling run."""

    def __init__(self, model: torch.nn.Module, threshold: float, num_steps: int,
                 group: Optional["torch.distributed.ProcessGroup"] = None, first_step: int = 0) -> None:
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        if not 0 <= first_step <= num_steps:
            raise ValueError(f"first step must be in [0, {num_steps}], got {first_step}")
        self.model, self.threshold, self.num_steps, self.group = model, threshold, num_steps, group
        self.first_step = first_step
        self.step = first_step  # the schedule step of the next call
        self.skipped: list[int] = []
        self._accumulated = 0.0
        self._previous: Optional[torch.Tensor] = None
        self._residual: Optional[torch.Tensor] = None

    def _relative_change(self, modulated: torch.Tensor) -> float:
        previous, self._previous = self._previous, modulated
        if previous is None:
            return float("inf")
        sums = torch.stack([(modulated - previous).abs().sum(), previous.abs().sum()]).double()
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(sums, group=self.group)
        return (sums[0] / sums[1]).item() if sums[1] > 0 else float("inf")

    def _should_compute(self, modulated: torch.Tensor) -> bool:
        self._accumulated += self._relative_change(modulated)
        last = self.step == self.num_steps - 1
        if self._residual is None or last or self._accumulated >= self.threshold:
            self._accumulated = 0.0
            return True
        return False

    @torch.no_grad()
    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        model = self.model
        inputs = model.embed(hidden_states, timestep, **cond)
        modulated = model.blocks()[0].norm1(inputs.x, inputs.c, inputs.temb)[0].float()
        x, c = model.shard_streams(inputs)
        if self._should_compute(modulated):
            out = model.run_blocks(x, c, inputs)
            self._residual = out.float() - x.float()
        else:
            out = (x.float() + self._residual).to(x.dtype)
            self.skipped.append(self.step)
        self.step += 1
        return model.head(out, inputs)

    @property
    def steps_run(self) -> int:
        return self.step - self.first_step

    @property
    def skipped_fraction(self) -> float:
        return len(self.skipped) / max(self.steps_run, 1)


__all__ = ["StepCache"]
