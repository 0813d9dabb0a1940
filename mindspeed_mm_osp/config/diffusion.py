"""`diffusion` block: Open-Sora Plan flow matching (training and sampling)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .loader import require


@dataclass(frozen=True)
class DiffusionConfig:
    model_id: Literal["OpenSoraPlan"] = "OpenSoraPlan"
    weighting_scheme: Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    use_dynamic_shifting: bool = False
    shift: float = 1.0
    base_image_seq: int = 256
    max_image_seq: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    sigma_eps: float = 0.0
    # sampling
    num_inference_steps: int = 50
    guidance_scale: float = 4.5
    guidance_rescale: float = 0.7
    use_linear_quadratic_schedule: bool = False

    # Ranges of the numeric keys (checked by `loader.from_dict`); cross-key rules are in `validate`.
    _ranges = {"mode_scale": ">= 0", "base_image_seq": ">= 1", "guidance_scale": "[0, 100]",
               "num_inference_steps": "[1, 10000]"}

    def validate(self, file, path: str) -> None:
        p = f"{path}." if path else ""
        require(self.num_inference_steps >= 1, file, f"{p}num_inference_steps", "must be >= 1")
        require(self.shift > 0, file, f"{p}shift", f"must be > 0, got {self.shift}")
        require(self.max_image_seq > self.base_image_seq, file, f"{p}max_image_seq", "must be > base_image_seq")
        require(0.0 <= self.guidance_rescale <= 1.0, file, f"{p}guidance_rescale", "must be in [0, 1]")
        # The reference *returns* (does not raise) this ValueError; we raise it.
        require(0.0 <= self.sigma_eps <= 1e-2, file, f"{p}sigma_eps", f"must be in [0, 0.01], got {self.sigma_eps}")
        require(self.logit_std > 0, file, f"{p}logit_std", f"must be > 0, got {self.logit_std}")
        if self.use_linear_quadratic_schedule:
            require(self.num_inference_steps % 2 == 0, file, f"{p}num_inference_steps",
                    "the linear-quadratic schedule needs an even number of steps")
