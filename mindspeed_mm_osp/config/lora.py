"""LoRA fine-tuning settings (`--lora-r`, `--lora-alpha`, `--lora-dropout`, `--lora-target-modules`)."""

from __future__ import annotations

from dataclasses import dataclass

# Attention projections of both streams and both FFNs of every block (names relative to a block).
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                          "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_enc.net.0.proj", "ff_enc.net.2")
ALL_LINEARS = "all"  # a target name that selects every adaptable linear of the predictor
# Distillation adapts every linear: the student must scale the text's effect by the guidance folded into it, and
# the pooled text and the timestep reach each block only through the adaLN modulation linears (the caption through
# its projection), which attention and FFN adapters cannot rescale (docs/distillation.md).
DISTILL_TARGET_MODULES = (ALL_LINEARS,)


def default_targets(given, distill: bool) -> tuple[str, ...]:
    """The adapter targets: `given` (`--lora-target-modules`) when set, else the default of the run's kind."""
    if given:
        return tuple(given)
    return DISTILL_TARGET_MODULES if distill else DEFAULT_TARGET_MODULES


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, scaling and targets of the adapters. `alpha=None` means alpha = r (scaling 1).

    Target names are module names of the predictor or their dotted suffixes (`to_q` matches every
    `...attn1.to_q`), or `all` for every linear; `models.lora.apply_lora` refuses names that match no linear layer.
    """

    r: int
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    init_seed: int = 0  # A's init depends only on (seed, module name): identical at every TP size

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"--lora-r={self.r!r} must be a positive integer")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"--lora-alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout={self.dropout!r} must lie in [0, 1)")
        if not self.target_modules:
            raise ValueError("--lora-target-modules needs at least one module name")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.r) / self.r
