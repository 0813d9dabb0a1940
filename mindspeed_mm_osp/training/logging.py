"""Training log lines in Megatron's format, plus optional TensorBoard and W&B writers.

W&B runs offline unless `--wandb-mode online`; credentials come only from the
environment (WANDB_API_KEY), never from code or flags.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from .args import TrainingArgs

logger = logging.getLogger("mindspeed_mm_osp.train")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere; `OSP_LOG_LEVEL` (e.g. DEBUG: the full data filter table) overrides rank 0.

    Every rank reads the same annotations, so only rank 0 reports the records they drop; the tensor/context
    parallel peers of a data-parallel replica read the same samples, so only its first rank reports read failures.
    """
    from .. import platform

    level = (logging.getLevelName(os.environ.get("OSP_LOG_LEVEL", "INFO").upper()) if rank == 0
             else logging.WARNING)
    logging.basicConfig(level=level if isinstance(level, int) else logging.INFO, format="%(message)s", force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every DDP bucket's parameters
    platform.silence_third_party()
    if rank != 0:
        logging.getLogger("mindspeed_mm_osp.data.annotations").setLevel(logging.ERROR)
    if not _first_of_replica():
        logging.getLogger("mindspeed_mm_osp.data.dataset").setLevel(logging.ERROR)


def _first_of_replica() -> bool:
    """Whether this rank is the first tensor- and context-parallel rank of its data-parallel replica."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0


def _tflops(value: float) -> str:
    """At least three significant digits, so a CPU run's small throughput does not print as 0.000."""
    decimals = 3 if value <= 0 or value >= 0.1 else 2 - math.floor(math.log10(value))
    return f"{value:.{decimals}f}"


@dataclass
class IterationStats:
    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float
    learning_rate: float
    global_batch_size: int
    loss: float
    grad_norm: Optional[float]
    clip_threshold: Optional[float]
    skipped_iterations: int
    nan_iterations: int
    samples_per_second: float
    tflops_per_device: Optional[float] = None
    mfu: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_step(cls, *, iteration: int, train_iters: int, consumed_samples: int, global_batch_size: int,
                  learning_rate: float, loss: float, clip, elapsed_s: float, flops: float, data_parallel_size: int,
                  world_size: int, peak_flops: Optional[float], skipped_iterations: int, nan_iterations: int,
                  read_failures: Mapping[str, int]) -> "IterationStats":
        """Derived metrics of one iteration. `clip` is its `optim.ClipStepResult`; `flops` the predictor's
        training FLOPs of this replica's micro-batches, spread over the replica's (TP) devices."""
        per_device = flops * data_parallel_size / world_size / elapsed_s if elapsed_s > 0 else 0.0
        decision = clip.decision
        return cls(
            iteration=iteration, train_iters=train_iters, consumed_samples=consumed_samples,
            elapsed_ms=1000 * elapsed_s, learning_rate=learning_rate, global_batch_size=global_batch_size,
            loss=loss, grad_norm=clip.grad_norm,
            clip_threshold=decision.threshold if decision and math.isfinite(decision.threshold) else None,
            skipped_iterations=skipped_iterations, nan_iterations=nan_iterations,
            samples_per_second=global_batch_size / elapsed_s if elapsed_s > 0 else 0.0,
            tflops_per_device=per_device / 1e12, mfu=per_device / peak_flops if peak_flops else None,
            extra={"read failures": sum(read_failures.values())} if read_failures else {})


def format_line(s: IterationStats) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f" [{now}] iteration {s.iteration:8d}/{s.train_iters:8d}",
        f"consumed samples: {s.consumed_samples:12d}",
        f"elapsed time per iteration (ms): {s.elapsed_ms:.1f}",
    ]
    if s.tflops_per_device is not None:
        parts.append(f"throughput per device (TFLOP/s/device): {_tflops(s.tflops_per_device)}")
    if s.mfu is not None:
        parts.append(f"MFU: {100 * s.mfu:.1f}%")
    parts += [
        f"learning rate: {s.learning_rate:.6E}",
        f"global batch size: {s.global_batch_size:5d}",
        f"loss: {s.loss:.6E}",
        "grad norm: " + ("nan" if s.grad_norm is None else f"{s.grad_norm:.3f}"),
    ]
    if s.clip_threshold is not None:
        parts.append(f"clip threshold: {s.clip_threshold:.3f}")
    parts += [
        f"samples per second: {s.samples_per_second:.3f}",
        f"number of skipped iterations: {s.skipped_iterations:3d}",
        f"number of nan iterations: {s.nan_iterations:3d}",
    ]
    for k, v in s.extra.items():
        parts.append(f"{k}: {v}")
    return " | ".join(parts) + " |"


class MetricWriters:
    """TensorBoard and W&B, each only when asked for, on the logging rank."""

    def __init__(self, args: TrainingArgs, is_logging_rank: bool):
        self.tb = None
        self.wandb = None
        if not is_logging_rank:
            return
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=args.tensorboard_dir)
        if args.wandb_project:
            os.environ.setdefault("WANDB_MODE", args.wandb_mode)
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                                    dir=args.wandb_save_dir or args.save or ".", config=args.to_dict())

    def write(self, s: IterationStats) -> None:
        scalars = {"loss": s.loss, "learning-rate": s.learning_rate, "samples-per-second": s.samples_per_second,
                   "elapsed-ms": s.elapsed_ms, "skipped-iterations": s.skipped_iterations}
        if s.grad_norm is not None:
            scalars["grad-norm"] = s.grad_norm
        if s.clip_threshold is not None:
            scalars["clip-threshold"] = s.clip_threshold
        if s.mfu is not None:
            scalars["mfu"] = s.mfu
        self.write_scalars(scalars, s.iteration)

    def write_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)

    def write_videos(self, paths: list[Path], step: int) -> None:
        """Validation mp4s: to W&B as videos, to TensorBoard as a grid of their frames (its video panel needs
        moviepy, which is not a dependency)."""
        if self.tb is not None:
            import torch

            from ..inference.video_io import read_mp4

            for path in paths:
                frames, _ = read_mp4(path)
                self.tb.add_images(f"validation/{path.stem}", torch.from_numpy(frames), step, dataformats="NHWC")
        if self.wandb is not None and paths:
            import wandb

            self.wandb.log({f"validation/{p.stem}": wandb.Video(str(p), format="mp4") for p in paths}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
