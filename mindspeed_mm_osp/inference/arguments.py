"""`inference.py` flags: parsed once into a frozen `InferenceArgs`, merged into the inference JSON by `build_config`.

Flags come in two kinds. Overrides of the JSON (prompt, seed, sampler settings, size, dtype, save path) are
applied by `build_config`, and the merged `InferenceConfig` is validated again as a whole. Run options (TP/CP
sizes, weights, which stage to run, benchmark counts) stay in `InferenceArgs` and are read by
`runner.InferenceRunner`. A new sampling option (e.g. `--cfg-parallel`, `--cache-threshold`, `--compile`) is a field
here plus its flag in `build_parser`, read where the runner builds the model or runs its stage.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from ..config import ConfigError, InferenceConfig, from_dict, load_inference_config, to_dict
from ..config.inference import COMPILE_MODES
from ..errors import UserError, check_ranges, is_text
from ..parallel import ParallelConfigError
from ..parallel.context_parallel import check_context_parallel
from ..training.arguments import HelpFormatter
from .conditioning import ConditionRequest
from .editing import EditRequest
from .presets import Duration, add_preset_arguments, size_from_args


@dataclass(frozen=True, kw_only=True)
class InferenceArgs:
    config: str
    # overrides of the inference JSON (None: keep the JSON's value)
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    guidance_rescale: Optional[float] = None
    shift: Optional[float] = None
    size: Optional[tuple[int, int, int]] = None
    resolution: Optional[str] = None
    aspect_ratio: Optional[str] = None
    duration: Optional[Duration] = None
    save_path: Optional[str] = None
    overwrite: bool = False  # replace outputs already in the save path (refused otherwise)
    weight_dtype: Optional[str] = None
    # overrides of the JSON's `acceleration` block (docs/inference_acceleration.md)
    cfg_parallel: Optional[bool] = None
    cache_threshold: Optional[float] = None
    compile: Optional[bool] = None
    compile_mode: Optional[str] = None
    parallel_vae_decode: Optional[bool] = None
    # run options
    tp: int = 1
    cp: int = 1
    context_parallel_algo: str = "ulysses_cp_algo"
    predictor_weights: Optional[str] = None
    lora: Optional[str] = None
    lora_scale: float = 1.0
    save_latents: bool = False
    decode_latents: Optional[str] = None
    benchmark: bool = False
    warmup: int = 1
    repeat: int = 3
    report: Optional[str] = None
    # image-to-video / continuation (an inpaint predictor; `conditioning`)
    image: Optional[str] = None
    last_image: Optional[str] = None
    video: Optional[str] = None
    condition_frames: Optional[int] = None
    reimpose_condition: bool = True
    strength: Optional[float] = None  # with `video`: edit it (`editing`) instead of continuing it
    trust_pickle: tuple[str, ...] = ()  # files unpickled in full (docs/security.md)

    def condition_request(self) -> ConditionRequest:
        video = self.video if self.strength is None else None  # an edited clip is no condition
        return ConditionRequest(image=self.image, last_image=self.last_image, video=video,
                                condition_frames=self.condition_frames, reimpose=self.reimpose_condition)

    def edit_request(self) -> Optional[EditRequest]:
        return None if self.strength is None else EditRequest(self.video, self.strength)

    @property
    def size_preset(self) -> bool:
        """Whether --resolution/--aspect-ratio/--duration pick the output size."""
        return any(v is not None for v in (self.resolution, self.aspect_ratio, self.duration))


# The valid range of every numeric flag (`errors.check_ranges`; NaN and inf are refused everywhere).
RANGES = {
    "--seed": dict(low=0, high=2**32 - 1),
    "--num-inference-steps": dict(low=1, high=10000),
    "--guidance-scale": dict(low=0, high=100),
    "--guidance-rescale": dict(low=0, high=1),
    "--shift": dict(low=0, low_open=True, high=100),
    "--cache-threshold": dict(low=0),
    "--tensor-model-parallel-size": dict(low=1, high=1024),
    "--context-parallel-size": dict(low=1, high=1024),
    "--lora-scale": dict(low=-100, high=100),
    "--warmup": dict(low=0, high=10000),
    "--repeat": dict(low=1, high=10000),
    "--condition-frames": dict(low=1, high=100000),
    "--strength": dict(low=0, high=1),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inference.py", formatter_class=HelpFormatter,
                                description="Open-Sora Plan v1.5 text-to-video sampling (single process or torchrun). "
                                            "Flags left unset keep the value of the --config JSON.")
    p.add_argument("--config", required=True, help="inference JSON (e.g. inference_t2v_model1_5.json)")
    p.add_argument("--prompt", help="prompt text, or a file with one prompt per line")
    p.add_argument("--negative-prompt", help="appended to the v1.5 negative prompt")
    p.add_argument("--seed", type=int, help="noise seed of prompt i is seed + i")
    p.add_argument("--num-inference-steps", type=int, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float,
                   help="rescale the guided prediction towards the conditional one's std (0: off)")
    p.add_argument("--shift", type=float, help="static sigma shift (turns dynamic shifting off)")
    p.add_argument("--size", type=int, nargs=3, metavar=("FRAMES", "HEIGHT", "WIDTH"), help="output video size")
    add_preset_arguments(p)
    p.add_argument("--save-path", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs already in --save-path (and an existing --report); refused without it")
    p.add_argument("--weight-dtype", choices=["fp32", "fp16", "bf16"], help="predictor and text encoder dtype")
    accel = p.add_argument_group("acceleration (override the JSON's `acceleration` block; all off by default)")
    accel.add_argument("--cfg-parallel", action="store_const", const=True,
                       help="uncond and cond branches on two rank groups (world size = 2 x TP x n)")
    accel.add_argument("--cache-threshold", type=float, metavar="T",
                       help="TeaCache-style step cache: skip the blocks while the accumulated relative change of "
                            "the modulated input stays under T (0 never skips)")
    accel.add_argument("--compile", action="store_const", const=True, help="torch.compile each predictor block")
    accel.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile mode for --compile")
    accel.add_argument("--parallel-vae-decode", action="store_const", const=True,
                       help="spread the VAE decode over the ranks of each replica (exact; pays off above 30 latent "
                            "frames)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, dest="tp",
                   help="ranks that split the predictor's weights (divides predictor.num_heads)")
    p.add_argument("--context-parallel-size", type=int, default=1, dest="cp",
                   help="ranks that share one video's token sequence (Ulysses all-to-all around attention)")
    p.add_argument("--context-parallel-algo", default="ulysses_cp_algo", help="only ulysses_cp_algo is implemented")
    p.add_argument("--predictor-weights", help="merged/released weights file or a training checkpoint folder "
                                               "(default: predictor.from_pretrained)")
    p.add_argument("--lora", metavar="DIR", help="LoRA adapter checkpoint (pretrain.py --lora-r ... --save DIR) "
                                                 "applied unmerged on top of the predictor weights")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiplies the adapters' contribution")
    p.add_argument("--trust-pickle", action="append", default=[], metavar="FILE",
                   help="unpickle this one file in full although it needs Python globals outside the allow-list "
                        "(it can run code; docs/security.md); repeatable")
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--save-latents", action="store_true", help="stop after denoising; write latents")
    stage.add_argument("--decode-latents", metavar="DIR", help="decode latents written by --save-latents")
    stage.add_argument("--benchmark", action="store_true", help="time every stage; write --report, no videos")
    p.add_argument("--warmup", type=int, default=1, help="benchmark: untimed full runs first")
    p.add_argument("--repeat", type=int, default=3, help="benchmark: timed full runs")
    p.add_argument("--report", help="benchmark report path (default: <save-path>/benchmark.json)")
    _add_video_arguments(p)
    return p


def _add_video_arguments(p: argparse.ArgumentParser) -> None:
    """The given frames of image-to-video and continuation, and the clip to edit."""
    i2v = p.add_argument_group("image-to-video (predictor.model_id SparseUMMDiTInpaint; docs/i2v.md)")
    i2v.add_argument("--image", metavar="PATH", help="first frame of the video")
    i2v.add_argument("--last-image", metavar="PATH", help="last frame (with --image: a transition)")
    i2v.add_argument("--video", metavar="PATH", help="continue this clip (its first --condition-frames frames) or, "
                     "with --strength, edit it")
    i2v.add_argument("--condition-frames", type=int, metavar="K", help="with --video: how many frames are given")
    i2v.add_argument("--reimpose-condition", action=argparse.BooleanOptionalAction, default=True,
                     help="keep the fully given latent frames on their noising path at every step (default); "
                          "--no-reimpose-condition feeds them through the input channels only, as Open-Sora Plan 1.3")
    edit = p.add_argument_group("video editing (any predictor; docs/i2v.md)")
    edit.add_argument("--strength", type=float, metavar="S",
                      help="with --video: edit the clip's first frames under the prompt: skip the first N x (1 - S) "
                           "of the N steps (rounded half up), noise its latents to the schedule's sigma there and "
                           "denoise the rest (1: text-to-video from the same noise, 0: the clip's VAE round trip)")


def _register_trusted(p: argparse.ArgumentParser, files: tuple[str, ...]) -> None:
    """Hand the `--trust-pickle` files to the package's one pickle policy (`checkpoint.safe_load`)."""
    from ..checkpoint import CheckpointError
    from ..checkpoint.safe_load import trust_pickle

    try:
        trust_pickle(files)
    except CheckpointError as e:
        p.error(str(e))


def _check_video_flags(p: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """`--video` is continued (`--condition-frames`) or edited (`--strength`): exactly one, and never with images."""
    for flag, value in (("--condition-frames K", ns.condition_frames), ("--strength S", ns.strength)):
        if value is not None and ns.video is None:
            p.error(f"{flag} needs --video PATH")
    if ns.video is None:
        return
    if ns.condition_frames is None and ns.strength is None:
        p.error("--video needs --condition-frames K (continue the clip) or --strength S (edit it)")
    if ns.condition_frames is not None and ns.strength is not None:
        p.error("--condition-frames (continuation) and --strength (editing) cannot be combined; pass one")
    if ns.image is not None or ns.last_image is not None:
        p.error("--video cannot be combined with --image/--last-image")


def parse_args(argv: Optional[Sequence[str]] = None) -> InferenceArgs:
    """The command line, checked; exit 2 naming the flag when it is wrong."""
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.size is not None and any(v is not None for v in (ns.resolution, ns.aspect_ratio, ns.duration)):
        p.error("--size cannot be combined with --resolution/--aspect-ratio/--duration")
    if ns.lora_scale != 1.0 and ns.lora is None:
        p.error("--lora-scale needs --lora DIR")
    for flag, text in (("--prompt", ns.prompt), ("--negative-prompt", ns.negative_prompt)):
        if text is not None and not is_text(text):
            p.error(f"{flag}: not valid UTF-8 text; pass the prompt as UTF-8")
    dests = {a.option_strings[0]: a.dest for a in p._actions if a.option_strings}
    try:
        check_ranges({flag: getattr(ns, dests[flag]) for flag in RANGES}, RANGES)
    except UserError as e:
        p.error(str(e))
    _check_video_flags(p, ns)
    try:
        check_context_parallel(ns.cp, ns.context_parallel_algo)
    except ParallelConfigError as e:
        p.error(str(e))
    if ns.size is not None:
        ns.size = tuple(ns.size)
    ns.trust_pickle = tuple(ns.trust_pickle)
    _register_trusted(p, ns.trust_pickle)
    return InferenceArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(InferenceArgs)})


def build_config(args: InferenceArgs, diffusion_defaults: Optional[dict] = None) -> InferenceConfig:
    """The JSON with the command-line overrides applied, validated again as a whole. `diffusion_defaults` (a
    distilled student's schedule, `diffusion.student`) replace the JSON's `diffusion` keys before the flags do."""
    data = to_dict(load_inference_config(args.config))
    data["diffusion"].update(diffusion_defaults or {})
    top = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
           "save_path": args.save_path, "weight_dtype": args.weight_dtype}
    data.update({k: v for k, v in top.items() if v is not None})
    diffusion = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                 "guidance_rescale": args.guidance_rescale, "shift": args.shift}
    data["diffusion"].update({k: v for k, v in diffusion.items() if v is not None})
    if args.shift is not None:
        data["diffusion"]["use_dynamic_shifting"] = False
    acceleration = {"cfg_parallel": args.cfg_parallel, "cache_threshold": args.cache_threshold,
                    "compile": args.compile, "compile_mode": args.compile_mode,
                    "parallel_vae_decode": args.parallel_vae_decode}
    data["acceleration"].update({k: v for k, v in acceleration.items() if v is not None})
    if args.size is not None:
        data["pipeline_config"]["input_size"] = list(args.size)
    file = f"{args.config} + command line"
    cfg = from_dict(InferenceConfig, data, file=file)
    if not args.size_preset:
        return cfg
    try:  # the preset's duration counts frames at the fps the videos are written at
        size = size_from_args(args, tuple(cfg.pipeline_config.input_size), fps=cfg.output_fps)
    except ValueError as e:
        raise ConfigError(args.config, "--resolution/--aspect-ratio/--duration", str(e)) from e
    data["pipeline_config"]["input_size"] = list(size)
    return from_dict(InferenceConfig, data, file=file)


__all__ = ["InferenceArgs", "build_config", "build_parser", "parse_args"]
