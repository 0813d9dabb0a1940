"""Will it fit? Per-device memory and FLOPs of a training run, before launching it.

    python -m mindspeed_mm_osp.tools.plan --mm-model model.json --mm-data data.json [pretrain.py flags] \\
        [--world-size 8] [--frames 121 --height 576 --width 1024] [--device-memory-gib 80]
    python pretrain.py --plan [the same flags]     # the same, exits before training

Takes the same JSON configs and Megatron flags as `pretrain.py` (TP, SP, CP, micro-batch, recompute, precision,
distributed optimizer); frames/resolution/text length default to the data JSON. Prints weights, main grads,
optimizer state (fp32 master, Adam moments, EMA; sharded over DP x CP by the distributed optimizer), saved
activations, frozen encoders and a workspace estimate per device, and the FLOPs per step. With
`--device-memory-gib` it also suggests the smallest TP, and the cheapest recompute setting at that TP, that fit.
The figures come from `training/memory_plan.py` (derived from the model structure; docs/memory.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config.predictor import PredictorConfig, RecomputeConfig
from ..errors import UserError, check_ranges, entry_point
from ..training.memory_plan import GIB, EncoderPlan, MemoryPlan, OptimizerPlan, Parallel, Workload, plan_memory

# Architectures of the release's text encoders, used to count their parameters when the local folder is absent
# (t5-v1_1-xl encoder; CLIP ViT-bigG-14 text tower with projection).
RELEASE_TEXT_CONFIGS = {
    "T5": dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, vocab_size=32128,
               feed_forward_proj="gated-gelu"),
    "CLIPWithProjection": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                               num_hidden_layers=32, projection_dim=1280, vocab_size=49408,
                               max_position_embeddings=77),
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    tp: int
    recompute: RecomputeConfig
    plan: MemoryPlan


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


def suggest(cfg: PredictorConfig, work: Workload, world: int, cp: int, budget_gib: float, act_dtype: torch.dtype,
            opt: OptimizerPlan, encoders: EncoderPlan) -> Optional[Candidate]:
    """Smallest TP (a divisor of num_heads and of world/CP, with SP) and, at it, the cheapest recompute that
    fits `budget_gib` per device; None if nothing fits."""
    for tp in range(1, world // cp + 1):
        if cfg.num_heads % tp or (world // cp) % tp:
            continue
        par = Parallel(tp=tp, cp=cp, dp=world // (tp * cp), sequence_parallel=tp > 1)
        for recompute in recompute_options(sum(cfg.num_layers)):
            plan = plan_memory(cfg, work, par, recompute, act_dtype, opt, encoders)
            if plan.total <= budget_gib * GIB:
                return Candidate(tp, recompute, plan)
    return None


def describe_recompute(r: RecomputeConfig) -> str:
    if r.granularity == "full":
        return f"--recompute-granularity full --recompute-method block --recompute-num-layers {r.num_layers}"
    if r.selective_ffn_layers:
        return f"--selective_recom --recom_ffn_layers {r.selective_ffn_layers}"
    return "none"


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
    return PlanRequest(
        predictor=model_cfg.predictor, work=work, par=Parallel(tp, cp, dp, args.sequence_parallel),
        recompute=RecomputeArgs.from_namespace(args).recompute_config(), act_dtype=precision.predictor,
        opt=OptimizerPlan(distributed=args.use_distributed_optimizer),
        encoders=encoders, world=args.world_size, microbatches=max(1, global_batch // (args.micro_batch_size * dp)),
        notes=tuple(notes))


def run(args: argparse.Namespace) -> str:
    req = request_from_args(args)
    plan = plan_memory(req.predictor, req.work, req.par, req.recompute, req.act_dtype, req.opt, req.encoders)
    w = req.work
    if args.json:
        return json.dumps({"plan": dataclasses.asdict(plan), "total": plan.total}, indent=2)
    head = (f"TP={req.par.tp} SP={req.par.sp} CP={req.par.cp} DP={req.par.dp} micro-batch={w.micro_batch} "
            f"latent {w.latent_frames}x{w.latent_height}x{w.latent_width} text {w.text_len} "
            f"{str(req.act_dtype)[6:]} recompute: {describe_recompute(req.recompute)}")
    out = [head, format_plan(plan, args.peak_tflops, req.microbatches), *req.notes]
    if args.device_memory_gib:
        best = suggest(req.predictor, req.work, req.world, req.par.cp, args.device_memory_gib, req.act_dtype,
                       req.opt, req.encoders)
        out.append(f"fits {args.device_memory_gib:g} GiB: " + (
            "nothing (raise TP/CP, lower the micro-batch or the resolution)" if best is None else
            f"--tensor-model-parallel-size {best.tp}{' --sequence-parallel' if best.tp > 1 else ''} "
            f"recompute {describe_recompute(best.recompute)} ({best.plan.total / GIB:.1f} GiB)"))
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    from ..training.arguments import build_parser as training_parser

    p = training_parser()
    p.prog = "python -m mindspeed_mm_osp.tools.plan"
    g = p.add_argument_group("planner")
    g.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 8)),
                   help="devices in the job (default: $WORLD_SIZE, else 8: one node)")
    g.add_argument("--frames", type=int, default=None, help="video frames (default: data JSON num_frames)")
    g.add_argument("--height", type=int, default=None, help="default: data JSON max_height")
    g.add_argument("--width", type=int, default=None, help="default: data JSON max_width")
    g.add_argument("--text-len", type=int, default=None, help="text tokens (default: data JSON model_max_length)")
    g.add_argument("--device-memory-gib", type=float, default=None,
                   help="suggest the smallest TP and cheapest recompute that fit this much memory per device")
    g.add_argument("--json", action="store_true", help="print the plan as JSON")
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

    args = build_parser().parse_args(argv)
    check_ranges({flag: getattr(args, flag[2:].replace("-", "_")) for flag in RANGES}, RANGES)
    check_values(args)
    print(run(args))


if __name__ == "__main__":
    main()
