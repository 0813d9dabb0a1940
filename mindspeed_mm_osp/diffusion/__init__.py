"""Flow matching for Open-Sora Plan v1.5: training noising/loss and the Euler CFG sampler."""

from .flow_matching import (
    FlowMatchingScheduler,
    dynamic_shift_mu,
    image_seq_len,
    linear_quadratic_schedule,
    shift_sigmas,
)
from .sampling import apply_guidance, sample

__all__ = [
    "FlowMatchingScheduler", "apply_guidance", "dynamic_shift_mu", "image_seq_len", "linear_quadratic_schedule",
    "sample", "shift_sigmas",
]
