"""The validated `pretrain.py` flags as frozen, typed dataclasses, one per concern.

`arguments.parse_args` parses and cross-checks the Megatron command line once, then freezes it
into a `TrainingArgs`. `TrainingArgs` inherits every per-concern group, so `args.lr` reads as
on the command line, while a builder states the one concern it needs in its signature
(`wrap_ddp(model, parallel: ParallelArgs)`, `OptimizerSettings.from_args(args: OptimizerArgs)`).

A new feature with its own flags adds a group here (e.g. `LoraArgs` for `--lora-*`), adds it to
`TrainingArgs`' bases, declares the flags in `arguments.build_parser` and checks them in
`arguments.validate`; nothing else reads the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..config.lora import DEFAULT_TARGET_MODULES, LoRAConfig
from ..config.predictor import RecomputeConfig


class _Flags:
    """A group of flags, filled from an argparse namespace holding (at least) its fields."""

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace):
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, kw_only=True)
class ModelArgs(_Flags):
    """Which configs to build and in which dtypes."""

    mm_data: str
    mm_model: str
    model_custom_precision: bool = True
    bf16: bool = False
    fp16: bool = False
    i2v_loss_region: str = "all"  # "all" | "generated" (image-to-video: which latent frames the loss covers)


@dataclass(frozen=True, kw_only=True)
class ParallelArgs(_Flags):
    """Process groups and the DDP wrapper (`data_parallel_size` is derived from the world size)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    context_parallel_algo: str = "ulysses_cp_algo"
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    distributed_timeout_minutes: float = 30.0
    data_parallel_random_init: bool = False
    data_parallel_size: int = 1


@dataclass(frozen=True, kw_only=True)
class ScheduleArgs(_Flags):
    """Batch sizes and length of the run (`num_microbatches` is the derived gradient accumulation)."""

    micro_batch_size: int = 1
    global_batch_size: int = 1
    num_microbatches: int = 1
    train_iters: Optional[int] = None  # None (only --train-epochs): the trainer sets what the epochs give
    train_epochs: Optional[int] = None  # passes over the data (None: one); the trainer caps train_iters to them
    seed: int = 1234


@dataclass(frozen=True, kw_only=True)
class OptimizerArgs(_Flags):
    """Optimizer, LR schedule and gradient clipping (read by `optim.OptimizerSettings.from_args`)."""

    optimizer_selection: str = "fused_ema_adamw"
    ema_decay: float = 0.9999
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "constant"
    lr_decay_iters: Optional[int] = None
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    lr_warmup_init: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    clip_grad_ema_decay: Optional[float] = None
    max_consecutive_skips: int = 10
    override_opt_param_scheduler: bool = False  # resume on the flags' LR schedule
    use_checkpoint_opt_param_scheduler: bool = False  # resume on the checkpoint's LR schedule


@dataclass(frozen=True, kw_only=True)
class RecomputeArgs(_Flags):
    """Activation recomputation flags, reduced to the predictor's `RecomputeConfig`."""

    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: int = 0
    selective_recom: bool = False
    recom_ffn_layers: int = 0

    def recompute_config(self) -> RecomputeConfig:
        full = self.recompute_granularity == "full" and self.recompute_num_layers > 0
        return RecomputeConfig(granularity="full" if full else None, method="block",
                               num_layers=self.recompute_num_layers if full else 0,
                               selective_ffn_layers=self.recom_ffn_layers if self.selective_recom else 0)


@dataclass(frozen=True, kw_only=True)
class CheckpointArgs(_Flags):
    """Where to save and resume, and when to stop early."""

    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    finetune: bool = False
    ckpt_step: Optional[int] = None
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    verify_checkpoint: bool = False  # checksums against the manifest on --load/--lora-load
    ckpt_format: str = "legacy"  # what --save writes: legacy or torch_dist (checkpoint.dist_format)
    async_save: bool = False  # write checkpoints in the background (checkpoint.async_save)
    trust_pickle: tuple[str, ...] = ()  # files unpickled in full (docs/security.md)


@dataclass(frozen=True, kw_only=True)
class LoggingArgs(_Flags):
    """Log lines, TensorBoard, W&B and the MFU denominator."""

    log_interval: int = 1
    log_throughput: bool = False
    tensorboard_dir: Optional[str] = None
    tensorboard_log_interval: int = 1
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    wandb_mode: str = "offline"
    peak_tflops: Optional[float] = None


@dataclass(frozen=True, kw_only=True)
class LoraArgs:
    """LoRA fine-tuning (`--lora-r` turns it on): adapters on a frozen base. `--load` then names the base weights
    (a weights file or a full-model checkpoint folder) and `--lora-load` the adapter checkpoint to resume."""

    lora_r: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lora_load: Optional[str] = None

    def lora_config(self) -> Optional[LoRAConfig]:
        if self.lora_r is None:
            return None
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          target_modules=self.lora_target_modules)


@dataclass(frozen=True, kw_only=True)
class DistillArgs:
    """Few-step distillation (`--distill` turns it on; docs/distillation.md): a LoRA student of the frozen base."""

    distill: Optional[str] = None
    distill_student_steps: int = 4
    distill_teacher_substeps: int = 12
    distill_guidance_scale: float = 8.0
    distill_guidance_rescale: float = 0.7
    distill_shift: float = 7.0
    # T5 tokens per text, as the sampler cuts them (inference `model_max_length`; 512 in the release JSONs)
    distill_text_length: int = 512

    def student_schedule(self):
        """The `diffusion.student.StudentSchedule` this run trains for (None without --distill)."""
        from ..diffusion.student import StudentSchedule

        if self.distill is None:
            return None
        return StudentSchedule(student_steps=self.distill_student_steps, teacher_substeps=self.distill_teacher_substeps,
                               shift=self.distill_shift, guidance_scale=self.distill_guidance_scale,
                               guidance_rescale=self.distill_guidance_rescale, method=self.distill)


@dataclass(frozen=True, kw_only=True)
class ValidationArgs(_Flags):
    """Validation loss on a held-out set and EMA samples of fixed prompts during training (`training.validation`)."""

    mm_valid_data: Optional[str] = None
    eval_interval: Optional[int] = None
    eval_iters: Optional[int] = None  # validation batches of global_batch_size samples (None: every sample)
    eval_sigmas: int = 8
    validation_prompts: Optional[str] = None
    validation_interval: Optional[int] = None
    validation_steps: int = 10
    validation_size: Optional[str] = None  # "FxHxW" (None: the data JSON's num_frames x max_height x max_width)
    validation_guidance_scale: Optional[float] = None  # None: diffusion.guidance_scale of the model JSON


@dataclass(frozen=True, kw_only=True)
class TrainingArgs(ModelArgs, ParallelArgs, ScheduleArgs, OptimizerArgs, RecomputeArgs, CheckpointArgs, LoggingArgs,
                   LoraArgs, DistillArgs, ValidationArgs):
    """Every flag the trainer reads, validated (see `arguments.validate`); no-op flags are dropped."""

    inject_nonfinite_grad: Optional[str] = None  # fault injection of the reliability tests: "ITER:nan|inf,..."

    def to_dict(self) -> dict:
        """Plain values, for the checkpoint's `args` entry and the W&B run config."""
        return dataclasses.asdict(self)


__all__ = ["CheckpointArgs", "DistillArgs", "LoggingArgs", "LoraArgs", "ModelArgs", "OptimizerArgs", "ParallelArgs", "RecomputeArgs",
           "ScheduleArgs", "TrainingArgs", "ValidationArgs"]
