"""Will it fit? Per-device memory and FLOPs of a training run, before launching it.

    python -m mindspeed_mm_osp.tools.plan --mm-model model.json --mm-data data.json [pretrain.py flags] \\
        [--world-size 8] [--frames 121 --height 576 --width 1024] [--device-memory-gib 80]
    python pretrain.py --plan [the same flags]     # the same, exits before training

Takes the same JSON configs and Megatron flags as `pretrain.py` (TP, SP, CP, micro-batch, recompute, precision,
distributed optimizer); frames/resolution/text length default to the data JSON. With `--device-memory-gib` it
first answers YES or NO: does the per-device peak plus its headroom (allocator, fragmentation, runtime context;
`memory_plan.headroom`) fit? Then the cheapest change that fits, as flags to paste: the smallest TP, at it the
least recompute, with `--use-distributed-optimizer` where that is what makes it fit. Then the breakdown: weights,
main grads, optimizer state, saved activations, frozen encoders, workspace, FLOPs per step. The figures come from
`training/memory_plan.py` (derived from the model structure; docs/memory.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config.lora import default_targets
from ..config.predictor import PredictorConfig, RecomputeConfig
from ..diffusion.student import StudentSchedule
from ..errors import UserError, check_ranges, entry_point
from ..training.memory_plan import (GIB, EncoderPlan, MemoryPlan, OptimizerPlan, Parallel, TrainablePlan, Workload,
                                    adapter_param_count, fits, headroom, plan_memory)

# Architectures of the release's text encoders, used to count their parameters when the local folder is absent
# (t5-v1_1-xl encoder; CLIP ViT-bigG-14 text tower with projection).
RELEASE_TEXT_CONFIGS = {
    "T5": dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, vocab_size=32128,
               feed_forward_proj="gated-gelu"),
    "CLIPWithProjection": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                               num_hidden_layers=32, projection_dim=1280, vocab_size=49408,
                               max_position_embeddings=77),
}


def text_encoder_params(text_cfg) -> tuple[int, bool]:
    """(parameters, assumed) of a T5 / CLIP text encoder: from its local config.json, else (assumed=True) the
    release architecture."""
    import transformers

    classes = {"T5": (transformers.T5Config, transformers.T5EncoderModel),
               "CLIPWithProjection": (transformers.CLIPTextConfig, transformers.CLIPTextModelWithProjection)}
    config_cls, model_cls = classes[text_cfg.model_id]
    folder = Path(text_cfg.from_pretrained)
    found = (folder / "config.json").is_file()
    if found:
        config = config_cls.from_pretrained(str(folder), local_files_only=True)
    else:
        config = config_cls(**RELEASE_TEXT_CONFIGS[text_cfg.model_id])
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters()), not found


def encoder_plan(model_cfg, vae_dtype: torch.dtype, text_dtype: torch.dtype) -> tuple[EncoderPlan, list[str]]:
    """Frozen encoders every rank holds (none when the model JSON loads cached features), and a note for each
    text encoder whose folder is absent (counted with the release architecture)."""
    from ..models.ae.wfvae import WFVAE

    vae_params = text_params = 0
    notes = []
    if not model_cfg.load_video_features and model_cfg.ae is not None:
        with torch.device("meta"):
            vae_params = sum(p.numel() for p in WFVAE(model_cfg.ae).parameters())
    if not model_cfg.load_text_features:
        for text_cfg in (model_cfg.text_encoder, model_cfg.text_encoder_2):
            if text_cfg is not None:
                count, assumed = text_encoder_params(text_cfg)
                text_params += count
                if assumed:
                    notes.append(f"note: {text_cfg.from_pretrained} not found; {text_cfg.model_id} counted with "
                                 f"the release architecture ({count / 1e9:.2f} B params)")
    size = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    return EncoderPlan(vae_params, size(vae_dtype), text_params, size(text_dtype)), notes


def recompute_options(num_blocks: int) -> list[RecomputeConfig]:
    """Every recompute setting, cheapest (least recomputed forward) first: none, selective FFN of the first N
    blocks, then full blocks (a full block costs 3/2 of its FFN half)."""
    options = [RecomputeConfig()]
    options += [RecomputeConfig(selective_ffn_layers=n) for n in range(1, num_blocks + 1)]
    options += [RecomputeConfig(granularity="full", num_layers=n) for n in range(1, num_blocks + 1)]
    cost = lambda r: r.num_layers * 1.0 + r.selective_ffn_layers * 2 / 3  # noqa: E731
    return sorted(options, key=cost)


def format_plan(plan: MemoryPlan, peak_tflops: Optional[float], microbatches: int) -> str:
    rows = [("weights", plan.weights), ("main grads (fp32)", plan.grads), ("optimizer state", plan.optimizer),
            ("activations (saved)", plan.activations), ("frozen encoders", plan.encoders),
            ("workspace (estimate)", plan.workspace), ("total", plan.total)]
    lines = [f"  {name:22s} {value / GIB:9.2f} GiB" for name, value in rows]
    lines.append(f"  predictor params/rank {plan.params_local / 1e9:9.3f} B")
    step = plan.model_flops * microbatches
    lines.append(f"  model FLOPs/step/dev  {step / 1e12:9.1f} TFLOP  (hardware, with recompute: "
                 f"{plan.hardware_flops * microbatches / 1e12:.1f})")
    if peak_tflops:
        lines.append(f"  step time at 40% MFU {plan.hardware_flops * microbatches / (0.4 * peak_tflops * 1e12):9.2f} s")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """Everything the planner reads, resolved once from the JSON configs and flags."""

    predictor: PredictorConfig
    work: Workload
    par: Parallel
    recompute: RecomputeConfig
    act_dtype: torch.dtype
    opt: OptimizerPlan
    encoders: EncoderPlan
    world: int
    microbatches: int
    notes: tuple[str, ...] = ()
    global_batch: Optional[int] = None  # --global-batch-size when given
    trainable: TrainablePlan = TrainablePlan()  # LoRA adapters only, and distillation's teacher passes

    def plan(self, par: Parallel, recompute: RecomputeConfig, opt: OptimizerPlan) -> MemoryPlan:
        return plan_memory(self.predictor, self.work, par, recompute, self.act_dtype, opt, self.encoders,
                           self.trainable)


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    from ..config import load_data_config, load_model_config
    from ..training.args import ModelArgs, RecomputeArgs
    from ..training.components import resolve_precision

    model_cfg, data_cfg = load_model_config(args.mm_model), load_data_config(args.mm_data)
    pre = data_cfg.dataset_param.preprocess_parameters
    work = Workload.from_video(args.micro_batch_size, args.frames or pre.num_frames, args.height or pre.max_height,
                               args.width or pre.max_width, args.text_len or data_cfg.dataset_param.model_max_length,
                               model_cfg.ae.vae_scale_factor if model_cfg.ae is not None else (8, 8, 8))
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    if args.world_size % (tp * cp):
        raise UserError(f"--world-size={args.world_size} must be a multiple of TP x CP = {tp} x {cp}")
    model_cfg.predictor.validate_parallel(tp, cp, file=args.mm_model)
    dp = args.world_size // (tp * cp)
    precision = resolve_precision(model_cfg, ModelArgs.from_namespace(args))
    global_batch = args.global_batch_size or args.micro_batch_size * dp
    encoders, notes = encoder_plan(model_cfg, precision.vae, precision.text)
    return PlanRequest(trainable=trainable_plan(args),
        predictor=model_cfg.predictor, work=work, par=Parallel(tp, cp, dp, args.sequence_parallel),
        recompute=RecomputeArgs.from_namespace(args).recompute_config(), act_dtype=precision.predictor,
        opt=OptimizerPlan(distributed=args.use_distributed_optimizer),
        encoders=encoders, world=args.world_size, microbatches=max(1, global_batch // (args.micro_batch_size * dp)),
        notes=tuple(notes), global_batch=args.global_batch_size)


def trainable_plan(args: argparse.Namespace) -> TrainablePlan:
    """LoRA (`--lora-r`): the adapters this rank trains; `--distill`: the teacher's guided forwards per micro-batch,
    on average (cond and uncond rows in one forward when the guidance scale is above 1)."""
    if args.lora_r is None:
        return TrainablePlan()
    lora = TrainablePlan(lora_r=args.lora_r, lora_targets=default_targets(args.lora_target_modules, args.distill))
    if not args.distill:
        return lora
    schedule = StudentSchedule(args.distill_student_steps, args.distill_teacher_substeps, args.distill_shift,
                               args.distill_guidance_scale, args.distill_guidance_rescale)
    return dataclasses.replace(lora, teacher_passes=round(schedule.mean_teacher_steps()),
                               teacher_rows=2 if args.distill_guidance_scale > 1 else 1)


def trainable_lines(req: PlanRequest, plan: MemoryPlan) -> list[str]:
    """What LoRA and distillation change, and for distillation the full-weight student's figure next to it."""
    t = req.trainable
    if t.lora_r is None:
        return []
    adapters = adapter_param_count(req.predictor, req.par.tp, t.lora_r, t.lora_targets)
    lines = [f"  LoRA r={t.lora_r}: {adapters / 1e6:.1f} M adapter params/rank train; the base is frozen (weights only)"]
    if t.teacher_passes:
        full = dataclasses.replace(req, trainable=dataclasses.replace(t, lora_r=None, teacher_copy=True))
        full_plan = full.plan(req.par, req.recompute, req.opt)
        lines.append(f"  distillation: {t.teacher_passes} teacher forwards x {t.teacher_rows} rows per micro-batch "
                     f"(mean), without autograd, on the same weights (no second copy)")
        lines.append(f"  full-weight student instead (teacher + student copies): {_gib(full_plan.total)} GiB "
                     f"(+ headroom {_gib(headroom(full_plan))} GiB) vs {_gib(plan.total)} GiB")
    return lines


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting the planner tries: TP (SP on above 1), recompute and the distributed optimizer."""

    tp: int
    recompute: RecomputeConfig
    distributed: bool
    plan: MemoryPlan


def suggest(req: PlanRequest, device_gib: float) -> Optional[Candidate]:
    """The cheapest setting that fits `device_gib` per device with its headroom, None if nothing does.

    Cheapest: the smallest TP (a divisor of num_heads and of world / CP; fewer ranks per replica, less
    communication), then the least recomputed forward at it, then the user's own optimizer setting before the
    distributed optimizer (which costs no compute: its reduce-scatter + all-gather move what an all-reduce moves)."""
    dp_cp = req.world // req.par.cp
    for tp in range(1, dp_cp + 1):
        if req.predictor.num_heads % tp or dp_cp % tp:
            continue
        par = Parallel(tp=tp, cp=req.par.cp, dp=dp_cp // tp, sequence_parallel=tp > 1)
        for recompute in recompute_options(sum(req.predictor.num_layers)):
            for distributed in dict.fromkeys((req.opt.distributed, True)):
                opt = dataclasses.replace(req.opt, distributed=distributed)
                plan = req.plan(par, recompute, opt)
                if fits(plan, device_gib * GIB):
                    return Candidate(tp, recompute, distributed, plan)
    return None


def describe_recompute(r: RecomputeConfig) -> str:
    if r.granularity == "full":
        return f"full, first {r.num_layers} blocks"
    if r.selective_ffn_layers:
        return f"selective FFN, first {r.selective_ffn_layers} blocks"
    return "none"


def _recompute_flags(r: RecomputeConfig) -> list[str]:
    if r.granularity == "full":
        return ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers",
                str(r.num_layers)]
    return ["--selective_recom", "--recom_ffn_layers", str(r.selective_ffn_layers)] if r.selective_ffn_layers else []


def change_flags(req: PlanRequest, cand: Candidate) -> tuple[list[str], list[str]]:
    """(flags to append, flags to remove) that turn the user's command line into `cand`: appended values win
    over earlier ones; a switch that is on can only be removed."""
    add, drop = [], []
    if cand.tp != req.par.tp:
        add += ["--tensor-model-parallel-size", str(cand.tp)]
    replicas = req.work.micro_batch * req.world // (cand.tp * req.par.cp)
    if req.global_batch is not None and req.global_batch % replicas:  # keep the gradient accumulation steps
        add += ["--global-batch-size", str(req.microbatches * replicas)]
    if cand.tp > 1 and not req.par.sequence_parallel:
        add.append("--sequence-parallel")
    if cand.distributed and not req.opt.distributed:
        add.append("--use-distributed-optimizer")
    if cand.recompute != req.recompute:
        add += _recompute_flags(cand.recompute)
        if req.recompute.granularity == "full" and cand.recompute.granularity != "full":
            add += ["--recompute-num-layers", "0"]
        if req.recompute.selective_ffn_layers and not cand.recompute.selective_ffn_layers:
            drop += ["--selective_recom", "--recom_ffn_layers"]
    return add, drop


def training_command(argv: Sequence[str], add: Sequence[str], drop: Sequence[str]) -> list[str]:
    """`pretrain.py` flags: the user's, without --plan, the planner's own flags and the flags `add` sets again or
    `drop` removes (any spelling, `--flag=value` too), then `add`."""
    parser = build_parser()
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    own = [*RANGES, "--json", "--plan"]
    removed = {id(actions[f]) for f in [*drop, *(t for t in add if t.startswith("--")), *own]}
    out, skip = [], 0
    for token in argv:
        if skip:
            skip -= 1
            continue
        action = actions.get(token.split("=", 1)[0])
        if action is not None and id(action) in removed:
            skip = 0 if "=" in token else (1 if action.nargs is None else 0)
            continue
        out.append(token)
    return out + list(add)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def fit_lines(req: PlanRequest, plan: MemoryPlan, argv: Sequence[str], device_gib: float) -> list[str]:
    """The answer first (YES/NO with the headroom), then the cheapest setting that fits as flags to paste."""
    need, ok = plan.total + headroom(plan), fits(plan, device_gib * GIB)
    lines = [f"fits {device_gib:g} GiB per device: {'YES' if ok else 'NO'} (peak {_gib(plan.total)} GiB + headroom "
             f"{_gib(headroom(plan))} GiB = {_gib(need)} GiB of {device_gib:g})"]
    best = suggest(req, device_gib)
    if best is None:
        return lines + ["nothing fits at any TP and recompute: raise --context-parallel-size or --world-size, "
                        "lower --micro-batch-size or the resolution"]
    add, drop = change_flags(req, best)
    if not add and not drop:
        return lines + ["this is the cheapest setting that fits"]
    lines.append(f"{'smallest TP that also fits' if ok else 'cheapest change that fits'}: TP {best.tp}{' + SP' if best.tp > 1 else ''}, recompute "
                 f"{describe_recompute(best.recompute)}, {'distributed' if best.distributed else 'plain'} optimizer:"
                 f" {_gib(best.plan.total)} GiB + headroom {_gib(headroom(best.plan))} GiB")
    lines.append("  append:  " + shlex.join(add))
    if drop:
        lines.append("  remove:  " + " ".join(drop))
    lines.append("  flags:   " + shlex.join(training_command(argv, add, drop)))
    return lines


def run(args: argparse.Namespace) -> str:
    req = request_from_args(args)
    plan = req.plan(req.par, req.recompute, req.opt)
    w = req.work
    if args.json:
        report = {"plan": dataclasses.asdict(plan), "total": plan.total, "headroom": headroom(plan)}
        if args.device_memory_gib:
            report["fits"] = fits(plan, args.device_memory_gib * GIB)
        return json.dumps(report, indent=2)
    out = fit_lines(req, plan, args.argv, args.device_memory_gib) if args.device_memory_gib else []
    out.append(f"TP={req.par.tp} SP={req.par.sp} CP={req.par.cp} DP={req.par.dp} micro-batch={w.micro_batch} "
               f"latent {w.latent_frames}x{w.latent_height}x{w.latent_width} text {w.text_len} "
               f"{str(req.act_dtype)[6:]} recompute: {describe_recompute(req.recompute)}")
    return "\n".join([*out, format_plan(plan, args.peak_tflops, req.microbatches), *trainable_lines(req, plan),
                      *req.notes])


PLANNER_GROUP = "planner (its own flags; then every pretrain.py flag, read as pretrain.py reads them)"


def build_parser() -> argparse.ArgumentParser:
    """The planner's own flags first, then the training flags (`pretrain.py --plan` passes its whole line)."""
    from ..training.arguments import HelpFormatter, _Parser, add_training_flags

    p = _Parser(prog="python -m mindspeed_mm_osp.tools.plan", allow_abbrev=False, formatter_class=HelpFormatter,
                usage="%(prog)s --mm-model MODEL.json --mm-data DATA.json [planner flags] [pretrain.py flags]",
                description="Does a training run fit? Per-device memory and FLOPs of the run the pretrain.py flags "
                            "describe, and with --device-memory-gib a YES/NO and the cheapest change that fits.")
    g = p.add_argument_group(PLANNER_GROUP)
    g.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 8)),
                   help="devices in the job (from $WORLD_SIZE when set)")
    g.add_argument("--frames", type=int, default=None, help="video frames (default: data JSON num_frames)")
    g.add_argument("--height", type=int, default=None, help="video height (default: data JSON max_height)")
    g.add_argument("--width", type=int, default=None, help="video width (default: data JSON max_width)")
    g.add_argument("--text-len", type=int, default=None, help="text tokens (default: data JSON model_max_length)")
    g.add_argument("--device-memory-gib", type=float, default=None,
                   help="memory per device: answer whether the run fits it and print the cheapest change that does")
    g.add_argument("--json", action="store_true", help="print the plan as JSON")
    g.add_argument("--plan", action="store_true", help="accepted, so that pretrain.py --plan can pass its whole line")
    add_training_flags(p)
    return p


# The valid range of every planner flag (`errors.check_ranges`); the training flags keep their own table.
RANGES = {"--world-size": dict(low=1, high=1 << 20), "--frames": dict(low=1, high=100000),
          "--height": dict(low=16, high=65536), "--width": dict(low=16, high=65536),
          "--text-len": dict(low=1, high=100000),
          "--device-memory-gib": dict(low=0, low_open=True, high=1 << 20)}


@entry_point("plan")
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Print the plan; the flags are range-checked as `pretrain.py` checks them, errors per `errors.entry_point`."""
    from ..training.arguments import check_values

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    check_ranges({flag: getattr(args, flag[2:].replace("-", "_")) for flag in RANGES}, RANGES)
    check_values(args)
    print(run(args))


if __name__ == "__main__":
    main()
