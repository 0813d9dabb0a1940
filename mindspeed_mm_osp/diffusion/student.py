"""The sigma grid of a distilled few-step student, and of the teacher trajectory it was trained to follow
(docs/distillation.md).

A student of K steps samples on linspace(1, 0, K + 1), shifted statically by `shift` (the sampler's grid with K
steps). The teacher covers each student step sigma_i -> sigma_{i+1} with M Euler sub-steps taken from the same
grid with K x M steps; since the shift is monotone, every M-th point of that grid is a student point (the
endpoints are set to the student's exactly, so no rounding separates the two grids).

The schedule travels with the student: in its adapter checkpoints (the `distill` entry of the LoRA metadata) and
in the weights file `convert_mm_to_ckpt.py --lora-merge` writes (the `student` metadata entry and
`convert_info.json`); `inference.py` reads it back (`diffusion_overrides`) to sample on the student's grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from .flow_matching import shift_sigmas

METHODS = ("trajectory",)


@dataclass(frozen=True)
class StudentSchedule:
    """What a distilled student was trained for: its steps, the teacher's sub-steps, shift and folded-in CFG."""

    student_steps: int
    teacher_substeps: int
    shift: float
    guidance_scale: float
    guidance_rescale: float
    method: str = "trajectory"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"distillation method must be one of {METHODS}, got {self.method!r}")
        if self.student_steps < 1 or self.teacher_substeps < 1 or not self.shift >= 1:
            # the sampler shifts only by s >= 1 (`FlowMatchingScheduler.sampling_sigmas`)
            raise ValueError(f"student steps, teacher sub-steps and the shift must be >= 1, got {self}")

    def sigmas(self, num_steps: Optional[int] = None) -> torch.Tensor:
        """The `num_steps` + 1 sigmas (fp32, 1 -> 0) of the Euler sampler on this shift (default: the student's K)."""
        grid = np.linspace(1.0, 0.0, (num_steps or self.student_steps) + 1)
        return torch.from_numpy(np.ascontiguousarray(shift_sigmas(grid, self.shift))).to(torch.float32)

    def teacher_segment(self, step: int) -> torch.Tensor:
        """The M + 1 sigmas the teacher integrates over for student step `step` (sigma_step -> sigma_step+1)."""
        if not 0 <= step < self.student_steps:
            raise ValueError(f"student step {step} is outside 0..{self.student_steps - 1}")
        m = self.teacher_substeps
        segment = self.sigmas(self.student_steps * m)[step * m:(step + 1) * m + 1].clone()
        student = self.sigmas()
        segment[0], segment[-1] = student[step], student[step + 1]
        return segment

    def step_probabilities(self) -> torch.Tensor:
        """The chance (fp64) of drawing student step i for a training point: sigma_i - sigma_i+1, the share of the
        noise range the step covers. An Euler step's error in x is its length times its velocity error, so the
        long low-noise steps decide the sample and get the most training."""
        sigmas = self.sigmas().double()
        return sigmas[:-1] - sigmas[1:]

    def mean_teacher_steps(self) -> float:
        """Guided teacher Euler steps per training point on average: i x M to reach x_i, M for the target."""
        steps = torch.arange(1, self.student_steps + 1, dtype=torch.float64)
        return float((self.step_probabilities() * steps).sum()) * self.teacher_substeps

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Mapping, source: str) -> "StudentSchedule":
        """The schedule a checkpoint or weights file recorded; a ValueError naming `source` when it is malformed."""
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            if not isinstance(record, Mapping) or set(record) != fields:
                raise ValueError(f"expected the keys {sorted(fields)}")
            return cls(**record)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: unreadable student schedule ({exc})") from None

    def diffusion_overrides(self) -> dict:
        """Keys of an inference `diffusion` block that make its sampler this student's: K steps on the static shift,
        CFG off (the teacher's guidance is folded into the student)."""
        return {"num_inference_steps": self.student_steps, "shift": self.shift, "use_dynamic_shifting": False,
                "use_linear_quadratic_schedule": False, "sigma_eps": 0.0, "guidance_scale": 1.0,
                "guidance_rescale": 0.0}


__all__ = ["METHODS", "StudentSchedule"]
