"""Megatron-style command line of `pretrain.py`.

Every flag of the reference launcher is accepted. Flags that only configure Megatron's
own GPT model (dummy `--num-layers`, `--seq-length`, ...) or that the reference itself
ignores are accepted and listed in `NO_OP_FLAGS` with the reason, which is their `--help` line; a flag is
either real or listed there, never both. Unknown flags fail with the flag named.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from ..config.lora import DEFAULT_TARGET_MODULES, LoRAConfig, default_targets
from ..diffusion.student import METHODS
from ..errors import UserError, check_ranges
from ..parallel import ParallelConfigError
from ..parallel.context_parallel import check_context_parallel
from .args import DistillArgs, TrainingArgs

# flag -> why it has no effect for SparseUMMDiT (printed in --help and docs/training.md)
NO_OP_FLAGS = {
    "--num-layers": "Megatron GPT dummy; the DiT layout comes from predictor.num_layers in --mm-model",
    "--hidden-size": "Megatron GPT dummy; hidden size is predictor.num_heads*head_dim",
    "--num-attention-heads": "Megatron GPT dummy; heads come from predictor.num_heads",
    "--seq-length": "Megatron GPT dummy (pipeline p2p shapes)",
    "--max-position-embeddings": "Megatron GPT dummy",
    "--attention-dropout": "Megatron GPT dummy; the DiT uses predictor.dropout",
    "--hidden-dropout": "Megatron GPT dummy; the DiT uses predictor.dropout",
    "--tokenizer-type": "dummy; tokenizers come from --mm-data",
    "--vocab-size": "dummy",
    "--position-embedding-type": "dummy; the DiT has its own 3-D RoPE",
    "--rotary-base": "dummy; the DiT's RoPE base is fixed at 10000",
    "--swiglu": "dummy (the DiT FFN is GELU-tanh)",
    "--no-masked-softmax-fusion": "affects Megatron attention only",
    "--fp32-residual-connection": "residuals are already gated in fp32 inside the DiT",
    "--attention-softmax-in-fp32": "SDPA / NPU fused attention accumulate softmax in fp32",
    "--use-ema": "the EMA is always kept, with every --optimizer-selection",
    "--normalization": "only used by MindSpeed's --use-fused-rmsnorm check",
    "--use-fused-rmsnorm": "q/k RMSNorm uses the fused kernel on Ascend automatically",
    "--qk-layernorm": "replicated q/k norm grads are always summed over TP (explicit rule, not a flag)",
    "--no-gradient-accumulation-fusion": "gradient accumulation fusion is always off (needs Apex/TE)",
    "--distributed-backend": "the backend follows the accelerator (hccl/nccl/gloo)",
    "--mm-tool": "the reference's profiler config; no profiler is built in (use torch.profiler around a run)",
    "--use-dist-ckpt": "deprecated in Megatron; choose the format with --ckpt-format",
    "--accumulate-allreduce-grads-in-fp32": "main gradients are always accumulated and reduced in fp32",
    "--log-throughput": "throughput is always on the iteration line",
    "--tensorboard-log-interval": "TensorBoard scalars are written at --log-interval",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless there is none to show (unset, a switch that is off) or the help line
    already says it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, []) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # clearer than argparse's default for unknown flags
        if message.startswith("unrecognized arguments"):
            flags = message.split(":", 1)[1].strip()
            message = (f"unknown flag(s): {flags}. See `pretrain.py --help` for the accepted Megatron and MM flags; "
                       f"remove the flag or check its spelling")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain.py", allow_abbrev=False, formatter_class=HelpFormatter,
                description="Open-Sora Plan v1.5 pretraining (SparseUMMDiT on megatron-core)")
    add_training_flags(p)
    p.add_argument("--plan", action="store_true",
                   help="print whether this run fits the device memory, its per-device memory and FLOPs, and the "
                        "cheapest change that fits, then exit before training (the planner's own flags: "
                        "python -m mindspeed_mm_osp.tools.plan --help)")
    return p


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """Every `pretrain.py` flag but `--plan`, in groups (the planner adds them after its own)."""
    _add_model_flags(p)
    _add_parallel_flags(p)
    _add_schedule_flags(p)
    _add_optimizer_flags(p)
    _add_precision_flags(p)
    _add_recompute_flags(p)
    _add_checkpoint_flags(p)
    _add_logging_flags(p)
    _add_lora_flags(p)
    _add_distill_flags(p)
    _add_validation_flags(p)
    # Fault injection for the reliability tests (docs/reliability.md): "ITER:nan|inf,..." overwrites one gradient
    # element after the grad reduce of that iteration.
    p.add_argument("--inject-nonfinite-grad", default=None, help=argparse.SUPPRESS)

    _add_no_op_flags(p)


def _add_no_op_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `NO_OP_FLAGS`, accepted for launcher compatibility; their help line is the reason."""
    noop = p.add_argument_group("accepted for launcher compatibility, no effect for this model")
    kinds = {int: ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
                   "--max-position-embeddings", "--vocab-size", "--rotary-base"),
             float: ("--attention-dropout", "--hidden-dropout"),
             str: ("--tokenizer-type", "--position-embedding-type", "--normalization", "--distributed-backend",
                   "--mm-tool")}
    for kind, flags in kinds.items():
        for flag in flags:
            noop.add_argument(flag, type=kind, default=None, help=f"no effect: {NO_OP_FLAGS[flag]}")
    noop.add_argument("--tensorboard-log-interval", type=int, default=1,
                      help=f"no effect: {NO_OP_FLAGS['--tensorboard-log-interval']}")
    valued = [*(flag for flags in kinds.values() for flag in flags), "--tensorboard-log-interval"]
    switches = [flag for flag in NO_OP_FLAGS if flag not in valued]
    for flag in switches:
        noop.add_argument(flag, action="store_true", help=f"no effect: {NO_OP_FLAGS[flag]}")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    mm = p.add_argument_group("multimodal configs")
    mm.add_argument("--mm-data", required=True, help="data JSON (dataset, preprocessing, dataloader)")
    mm.add_argument("--mm-model", required=True, help="model JSON (ae, text encoders, predictor, diffusion)")
    mm.add_argument("--model_custom_precision", "--model-custom-precision", action=argparse.BooleanOptionalAction,
                    default=True, help="per-component dtypes from the model JSON (VAE ae.dtype, text encoders and "
                                       "predictor weight_dtype); --no-model_custom_precision casts all to --bf16/--fp16")
    mm.add_argument("--i2v-loss-region", choices=["all", "generated"], default="all",
                    help="image-to-video training (SparseUMMDiTInpaint): the loss covers every latent frame (all, "
                         "as Open-Sora Plan 1.3) or only those with a generated frame (docs/i2v.md)")


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="ranks that split each predictor layer's weights (divides predictor.num_heads)")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                     help="must be 1: pipeline parallelism is refused by the trainer")
    par.add_argument("--context-parallel-size", type=int, default=1,
                     help="ranks that share one sample's video sequence (Ulysses all-to-all around attention)")
    par.add_argument("--context-parallel-algo", default="ulysses_cp_algo",
                     help="context-parallel algorithm; only ulysses_cp_algo is implemented")
    par.add_argument("--sequence-parallel", action="store_true",
                     help="split the residual stream over the TP ranks between the linears (ignored at TP 1)")
    par.add_argument("--use-distributed-optimizer", action="store_true",
                     help="shard the fp32 master weights, Adam moments and EMA over the data-parallel ranks")
    par.add_argument("--distributed-timeout-minutes", type=float, default=30.0,
                     help="timeout of every collective")
    par.add_argument("--overlap-grad-reduce", action="store_true",
                     help="reduce gradient buckets during backward")
    par.add_argument("--data-parallel-random-init", action="store_true",
                     help="a different weight initialisation on every data-parallel rank (as the reference)")


def _add_schedule_flags(p: argparse.ArgumentParser) -> None:
    bt = p.add_argument_group("batch and schedule")
    bt.add_argument("--micro-batch-size", type=int, default=1, help="samples per rank per forward")
    bt.add_argument("--global-batch-size", type=int, default=None,
                    help="samples per optimizer step; a multiple of micro-batch x data-parallel size (default: "
                         "micro-batch x data-parallel size, no accumulation)")
    bt.add_argument("--train-iters", type=int, default=None, help="optimizer steps to train (or --train-samples)")
    bt.add_argument("--train-samples", type=int, default=None,
                    help="samples to train; sets the steps when --train-iters is not given")
    bt.add_argument("--train-epochs", type=int, default=None,
                    help="passes over the data, each in a new order (default: one); alone it sets the steps, with "
                         "--train-iters the run stops at whichever comes first (docs/training.md, Epochs)")
    bt.add_argument("--seed", type=int, default=1234, help="seed of weights, noise and data order")


def _add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    opt = p.add_argument_group("optimizer")
    opt.add_argument("--optimizer-selection", "--optimizer", dest="optimizer_selection", default="fused_ema_adamw",
                     choices=["fused_ema_adamw", "adamw", "adam"], help="optimizer (every choice keeps the EMA)")
    opt.add_argument("--ema-decay", type=float, default=0.9999, help="decay of the EMA weights")
    opt.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    opt.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    opt.add_argument("--lr-decay-style", default="constant", choices=["constant", "linear", "cosine"],
                     help="learning-rate schedule after the warm-up")
    opt.add_argument("--lr-decay-iters", type=int, default=None, help="steps of the decay (default: --train-iters)")
    opt.add_argument("--lr-warmup-iters", type=int, default=0, help="steps of linear warm-up")
    opt.add_argument("--lr-warmup-fraction", type=float, default=None,
                     help="warm-up as a fraction of the decay steps (instead of --lr-warmup-iters)")
    opt.add_argument("--lr-warmup-init", type=float, default=0.0,
                     help="learning rate the warm-up starts from (with no warm-up the run starts at --lr)")
    opt.add_argument("--adam-beta1", type=float, default=0.9, help="Adam first-moment decay")
    opt.add_argument("--adam-beta2", type=float, default=0.999, help="Adam second-moment decay")
    opt.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    opt.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay")
    opt.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    opt.add_argument("--clip_grad_ema_decay", "--clip-grad-ema-decay", type=float, default=None,
                     help="enable adaptive 3-sigma EMA gradient clipping with this decay (v1.5 report)")
    opt.add_argument("--max-consecutive-skips", type=int, default=10,
                     help="stop (after saving the last good state) when this many steps in a row are skipped "
                          "for non-finite or extreme gradients")
    opt.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                     dest="override_opt_param_scheduler", action="store_true",
                     help="on resume, take the LR schedule from these flags and keep only the checkpoint's "
                          "position in it (e.g. to extend a run with a larger --train-iters)")
    opt.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                     dest="use_checkpoint_opt_param_scheduler", action="store_true",
                     help="on resume, take the LR schedule from the checkpoint and ignore the schedule flags")


def _add_precision_flags(p: argparse.ArgumentParser) -> None:
    prec = p.add_argument_group("precision")
    prec.add_argument("--bf16", action="store_true", help="train in bfloat16 (fp32 master weights)")
    prec.add_argument("--fp16", action="store_true", help="train in float16 (fp32 master weights)")


def _add_recompute_flags(p: argparse.ArgumentParser) -> None:
    rc = p.add_argument_group("recomputation")
    rc.add_argument("--recompute-granularity", default=None, choices=["full", "selective"],
                    help="full: recompute whole blocks in backward (with --recompute-num-layers)")
    rc.add_argument("--recompute-method", default=None, choices=["block", "uniform"],
                    help="which blocks full recompute covers; only block (the first N) is supported")
    rc.add_argument("--recompute-num-layers", type=int, default=0,
                    help="blocks recomputed in full, from the first")
    rc.add_argument("--selective_recom", "--selective-recom", dest="selective_recom", action="store_true",
                    help="recompute only the FFN half of blocks (with --recom_ffn_layers)")
    rc.add_argument("--recom_ffn_layers", "--recom-ffn-layers", dest="recom_ffn_layers", type=int, default=0,
                    help="blocks whose FFN half is recomputed, from the first (needs --selective_recom)")


def _add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    ck = p.add_argument_group("checkpointing")
    ck.add_argument("--save", default=None, help="checkpoint folder to write")
    ck.add_argument("--load", default=None, help="checkpoint folder (or weights file) to resume or start from")
    ck.add_argument("--save-interval", type=int, default=None, help="save every this many steps (needs --save)")
    ck.add_argument("--no-load-optim", action="store_true", help="load weights only, fresh optimizer state")
    ck.add_argument("--no-load-rng", action="store_true", help="do not restore the random generators")
    ck.add_argument("--no-save-optim", action="store_true", help="save weights without the optimizer state")
    ck.add_argument("--no-save-rng", action="store_true", help="save without the random generators")
    ck.add_argument("--finetune", action="store_true",
                    help="load weights only and start counting steps from 0")
    ck.add_argument("--ckpt-step", type=int, default=None, help="load this iteration instead of the latest")
    ck.add_argument("--exit-interval", type=int, default=None, help="save and exit at a step divisible by this")
    ck.add_argument("--exit-duration-in-mins", type=float, default=None,
                    help="save and exit after this many minutes of training")
    ck.add_argument("--ckpt-format", choices=("legacy", "torch_dist"), default="legacy",
                    help="how --save writes checkpoints: legacy (one file per TP rank, resumable at the same TP) or "
                         "torch_dist (megatron dist_checkpointing, resumable at any TP/CP/DP); --load reads either "
                         "(docs/checkpoints.md)")
    ck.add_argument("--async-save", action="store_true",
                    help="write checkpoints in a background process while training goes on; the tracker moves "
                         "only once every rank has written (docs/checkpoints.md)")
    ck.add_argument("--verify-checkpoint", action="store_true",
                    help="compare the checksums of the checkpoint read by --load/--lora-load with its manifest "
                         "(sizes are always compared), and of merged weights with the one they carry")
    ck.add_argument("--trust-pickle", action="append", default=[], metavar="FILE",
                    help="unpickle this one file in full although it needs Python globals outside the allow-list "
                         "(it can run code; docs/security.md); repeatable")


def _add_logging_flags(p: argparse.ArgumentParser) -> None:
    lg = p.add_argument_group("logging")
    lg.add_argument("--log-interval", type=int, default=1, help="print the iteration line every this many steps")
    lg.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
    lg.add_argument("--wandb-project", default=None, help="log to this Weights & Biases project")
    lg.add_argument("--wandb-exp-name", default=None, help="W&B run name")
    lg.add_argument("--wandb-save-dir", default=None, help="W&B local folder")
    lg.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"], help="W&B mode")
    lg.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak TFLOP/s for MFU (default: bf16 dense peak of known devices, measured on CPU)")


def _add_lora_flags(p: argparse.ArgumentParser) -> None:
    lo = p.add_argument_group("LoRA fine-tuning (docs/lora.md)")
    lo.add_argument("--lora-r", type=int, default=None,
                    help="LoRA rank; turns LoRA on: the base is frozen and only adapters train, --load names the "
                         "base weights (file or full-model checkpoint folder), checkpoints hold the adapters")
    lo.add_argument("--lora-alpha", type=float, default=None, help="scaling alpha / r (default alpha = r)")
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    lo.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                    help="predictor linears to adapt, by name or dotted suffix, or 'all' "
                         f"(default: {' '.join(DEFAULT_TARGET_MODULES)}; with --distill: all)")
    lo.add_argument("--lora-load", default=None, help="adapter checkpoint folder to resume (fresh start without one)")


_DISTILL = DistillArgs()  # the flags' defaults


def _add_distill_flags(p: argparse.ArgumentParser) -> None:
    ds = p.add_argument_group("few-step distillation (docs/distillation.md)")
    ds.add_argument("--distill", choices=METHODS, default=None,
                    help="train a few-step student (base + LoRA adapters, needs --lora-r) to follow the frozen base's "
                         "guided trajectory; --load names the base")
    ds.add_argument("--distill-student-steps", type=int, default=_DISTILL.distill_student_steps,
                    help="sampling steps K of the student")
    ds.add_argument("--distill-teacher-substeps", type=int, default=_DISTILL.distill_teacher_substeps,
                    help="teacher Euler steps per student step (the teacher samples with K x this many steps)")
    ds.add_argument("--distill-guidance-scale", type=float, default=_DISTILL.distill_guidance_scale,
                    help="classifier-free guidance scale folded into the student")
    ds.add_argument("--distill-guidance-rescale", type=float, default=_DISTILL.distill_guidance_rescale,
                    help="guidance rescale folded into the student (0: off)")
    ds.add_argument("--distill-shift", type=float, default=_DISTILL.distill_shift,
                    help="static sigma shift of the student's and the teacher's sampling grid")
    ds.add_argument("--distill-text-length", type=int, default=_DISTILL.distill_text_length,
                    help="T5 tokens of the captions and the teacher's negative prompt: the model_max_length of the "
                         "inference JSON the student will sample with (default 512, the release's)")


def _add_validation_flags(p: argparse.ArgumentParser) -> None:
    va = p.add_argument_group("validation during training (docs/training.md)")
    va.add_argument("--mm-valid-data", default=None, metavar="FILE",
                    help="validation data JSON (the format of --mm-data): its samples give the validation loss")
    va.add_argument("--eval-interval", type=int, default=None,
                    help="compute the validation loss every this many steps (needs --mm-valid-data)")
    va.add_argument("--eval-iters", type=int, default=None,
                    help="validation batches of --global-batch-size samples per evaluation (default: every sample)")
    va.add_argument("--eval-sigmas", type=int, default=8,
                    help="evenly spaced noise levels the validation loss is computed and logged at")
    va.add_argument("--validation-prompts", default=None, metavar="FILE",
                    help="prompt file (one a line) sampled with the EMA weights into <save>/validation/iter_N/")
    va.add_argument("--validation-interval", type=int, default=None,
                    help="sample --validation-prompts every this many steps")
    va.add_argument("--validation-steps", type=int, default=10, help="denoising steps of a validation sample")
    va.add_argument("--validation-size", default=None, metavar="FxHxW",
                    help="frames x height x width of validation samples (default: num_frames x max_height x "
                         "max_width of --mm-data)")
    va.add_argument("--validation-guidance-scale", type=float, default=None,
                    help="classifier-free guidance of validation samples (default: diffusion.guidance_scale of "
                         "--mm-model)")


def parse_fault_spec(spec: Optional[str]) -> dict[int, str]:
    """'3:nan,5:inf' -> {3: 'nan', 5: 'inf'} (fault-injection tests only)."""
    faults = {}
    for item in filter(None, (spec or "").split(",")):
        it, _, kind = item.partition(":")
        if not it.strip().isdigit():
            raise ValueError(f"expected ITER:nan|inf, got {item!r}")
        if kind not in ("nan", "inf"):
            raise ValueError(f"kind must be nan or inf, got {kind!r}")
        faults[int(it)] = kind
    return faults


class ArgumentError(UserError, ValueError):
    """A flag value or combination that cannot work; the message names the flag."""


# The valid range of every numeric flag (`errors.check_ranges`; NaN and inf are refused everywhere; a flag left
# unset passes). Cross-flag rules are in `_derive_batches` and `_check_combinations`; LoRA's in `LoRAConfig`.
RANGES = {
    "--tensor-model-parallel-size": dict(low=1), "--pipeline-model-parallel-size": dict(low=1),
    "--context-parallel-size": dict(low=1), "--micro-batch-size": dict(low=1),
    "--global-batch-size": dict(low=1),
    "--train-iters": dict(low=1),
    "--train-samples": dict(low=1),
    "--seed": dict(low=0, high=2**32 - 1),
    "--max-consecutive-skips": dict(low=1),
    "--log-interval": dict(low=0, low_open=True),
    "--save-interval": dict(low=0, low_open=True),
    "--tensorboard-log-interval": dict(low=1),
    "--lr": dict(low=0), "--min-lr": dict(low=0), "--lr-warmup-init": dict(low=0),
    "--weight-decay": dict(low=0), "--clip-grad": dict(low=0),
    "--lr-decay-iters": dict(low=1), "--lr-warmup-iters": dict(low=0), "--lr-warmup-fraction": dict(low=0, high=1),
    "--adam-beta1": dict(low=0, high=1, high_open=True), "--adam-beta2": dict(low=0, high=1, high_open=True),
    "--adam-eps": dict(low=0, low_open=True),
    "--ema-decay": dict(low=0, high=1, low_open=True, high_open=True),
    "--clip_grad_ema_decay": dict(low=0, high=1, low_open=True, high_open=True),
    "--distributed-timeout-minutes": dict(low=0, low_open=True),
    "--exit-interval": dict(low=0), "--exit-duration-in-mins": dict(low=0), "--peak-tflops": dict(low=0),
    "--ckpt-step": dict(low=0),
    "--recompute-num-layers": dict(low=0), "--recom_ffn_layers": dict(low=0),
    "--distill-student-steps": dict(low=1, high=1000), "--distill-teacher-substeps": dict(low=1, high=1000),
    "--distill-guidance-scale": dict(low=0, high=100), "--distill-guidance-rescale": dict(low=0, high=1),
    "--distill-shift": dict(low=1, high=100), "--distill-text-length": dict(low=1, high=1_000_000),
    "--train-epochs": dict(low=1), "--eval-interval": dict(low=1), "--eval-iters": dict(low=1),
    "--eval-sigmas": dict(low=1, high=1000), "--validation-interval": dict(low=1),
    "--validation-steps": dict(low=1, high=1000), "--validation-guidance-scale": dict(low=0, high=100),
}


def check_values(args: argparse.Namespace) -> None:
    """Per-flag ranges (`RANGES`), the fault spec and the context-parallel algorithm."""
    dests = {a.option_strings[0]: a.dest for a in build_parser()._actions if a.option_strings}
    try:
        check_ranges({flag: getattr(args, dests[flag]) for flag in RANGES}, RANGES)
    except UserError as e:
        raise ArgumentError(str(e)) from None
    try:
        parse_fault_spec(args.inject_nonfinite_grad)
    except ValueError as e:
        raise ArgumentError(f"--inject-nonfinite-grad: {e}") from e
    try:
        check_context_parallel(args.context_parallel_size, args.context_parallel_algo)
    except ParallelConfigError as e:
        raise ArgumentError(str(e)) from None


def _derive_batches(args: argparse.Namespace, world_size: int) -> None:
    """Data-parallel size, global batch, gradient accumulation and train_iters from the world size."""
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    if world_size < 1:
        raise ArgumentError(f"the world size (WORLD_SIZE) must be >= 1, got {world_size}")
    if world_size % (tp * cp) != 0:
        sizes = f"--tensor-model-parallel-size={tp}" + (f" x --context-parallel-size={cp}" if cp > 1 else "")
        raise ArgumentError(f"{sizes} must divide the world size {world_size}")
    dp = world_size // (tp * cp)  # CP peers train the same micro-batch, like TP peers
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ArgumentError(f"--global-batch-size={args.global_batch_size} must be a multiple of "
                            f"--micro-batch-size x data-parallel size = {args.micro_batch_size} x {dp}")
    args.data_parallel_size = dp
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.train_iters is None and args.train_samples is None and args.train_epochs is None:
        raise ArgumentError("set --train-iters, --train-samples or --train-epochs")
    if args.train_iters is None and args.train_samples is not None:
        args.train_iters = args.train_samples // args.global_batch_size
        if args.train_iters < 1:
            raise ArgumentError(f"--train-samples={args.train_samples} is less than one global batch")


def _check_combinations(args: argparse.Namespace) -> None:
    """Flags that only make sense together (or never together)."""
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are mutually exclusive")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ArgumentError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
                            "exclusive: keep the first to train on the flags' LR schedule, the second to keep the "
                            "checkpoint's")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False  # as Megatron: SP needs TP > 1
    full = args.recompute_granularity == "full" and args.recompute_num_layers > 0
    if args.selective_recom and full:
        raise ArgumentError("--selective_recom and --recompute-granularity full with --recompute-num-layers > 0 are "
                            "mutually exclusive; keep one (selective recomputes only FFNs)")
    if args.recompute_granularity == "full" and args.recompute_method not in (None, "block"):
        raise ArgumentError("only --recompute-method block is supported with --recompute-granularity full")
    if args.recom_ffn_layers and not args.selective_recom:
        raise ArgumentError("--recom_ffn_layers needs --selective_recom (the reference applied it silently; we don't)")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.async_save and args.save is None:
        raise ArgumentError("--async-save needs --save DIR (it changes how checkpoints are written)")
    _check_lora(args)
    _check_distill(args)
    _check_validation(args)


def _check_validation(args: argparse.Namespace) -> None:
    """Each validation flag with the ones it needs. `--eval-interval`/`--eval-iters` alone are accepted (the release
    launcher passes them; without `--mm-valid-data` there is nothing to validate, which the trainer says)."""
    pairs = (("--mm-valid-data", args.mm_valid_data, "--eval-interval N", args.eval_interval),
             ("--validation-interval", args.validation_interval, "--validation-prompts FILE", args.validation_prompts),
             ("--validation-prompts", args.validation_prompts, "--validation-interval N", args.validation_interval),
             ("--validation-prompts", args.validation_prompts, "--save DIR (samples go to <save>/validation)",
              args.save))
    for flag, value, needed, given in pairs:
        if value is not None and given is None:
            raise ArgumentError(f"{flag} needs {needed}")
    if args.validation_size is not None:
        parse_size(args.validation_size)


def parse_size(text: str) -> tuple[int, int, int]:
    """--validation-size 'FxHxW' -> (frames, height, width); ArgumentError otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ArgumentError(f"--validation-size {text!r}: expected FRAMESxHEIGHTxWIDTH of positive integers, "
                            "e.g. 17x64x128")
    frames, height, width = (int(p) for p in parts)
    return frames, height, width


def _check_distill(args: argparse.Namespace) -> None:
    if args.distill is None:
        given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(DistillArgs)
                 if getattr(args, f.name) != f.default]
        if given:
            raise ArgumentError(f"{', '.join(given)} need --distill trajectory")
        return
    if args.lora_r is None:
        raise ArgumentError("--distill trains a LoRA student on one copy of the base weights: add --lora-r R (e.g. "
                            "64); full-weight students are not supported yet (their memory: docs/distillation.md)")


def _check_lora(args: argparse.Namespace) -> None:
    given_targets = args.lora_target_modules is not None
    args.lora_target_modules = default_targets(args.lora_target_modules, args.distill is not None)
    if args.lora_r is None:
        given = [f"--{n.replace('_', '-')}" for n in ("lora_alpha", "lora_load") if getattr(args, n) is not None]
        if args.lora_dropout or given_targets:
            given.append("--lora-dropout/--lora-target-modules")
        if given:
            raise ArgumentError(f"{', '.join(given)} need --lora-r (LoRA fine-tuning)")
        return
    try:
        LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   target_modules=args.lora_target_modules)
    except ValueError as e:
        raise ArgumentError(str(e)) from None


def validate(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Cross-flag checks and derived sizes, done once before anything is built (fills in `args`)."""
    check_values(args)
    _derive_batches(args, world_size)
    _check_combinations(args)
    return args


def parse_args(argv: Optional[Sequence[str]] = None, world_size: int = 1) -> TrainingArgs:
    """The command line, validated and frozen; exit 2 with the flag named when it is wrong. Registers the
    `--trust-pickle` files with the package's one pickle policy (`checkpoint.safe_load`)."""
    from ..checkpoint import CheckpointError
    from ..checkpoint.safe_load import trust_pickle

    namespace = build_parser().parse_args(argv)
    namespace.trust_pickle = tuple(namespace.trust_pickle)
    try:
        args = TrainingArgs.from_namespace(validate(namespace, world_size))
        trust_pickle(args.trust_pickle)
        return args
    except (ArgumentError, CheckpointError) as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
