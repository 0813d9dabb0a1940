"""`inference.py` / `osp-inference`: Open-Sora Plan v1.5 text-to-video sampling (single process or torchrun).

    inference.py --config examples/tiny/inference.json --prompt "a cat" --save-path out/
    torchrun --nproc_per_node 2 inference.py --config ... --tensor-model-parallel-size 2
    torchrun --nproc_per_node 4 inference.py --config ... --tensor-model-parallel-size 2 --context-parallel-size 2
    inference.py --config ... --save-latents --save-path lat/      # stage 1: text encoders + predictor only
    inference.py --config ... --decode-latents lat/ --save-path vid/  # stage 2: VAE only
    inference.py --config ... --benchmark --warmup 1 --repeat 3 --report bench.json

Prompts (`--prompt` file, one per line, or a literal) are split over replicas (prompt i goes to replica
i mod replicas); a replica is one TP x CP group (all its ranks run the same pipeline on identical inputs; CP ranks
each hold a part of the video sequence inside the predictor), or with `--cfg-parallel` a pair of them running the
unconditional and conditional branch. Only TP rank 0 / CP rank 0 of a replica (of its unconditional branch)
writes, so every file has one writer; it also decodes, together with the replica's other ranks under
`--parallel-vae-decode`. The stages live in `runner.InferenceRunner` (docs/inference.md); accelerations:
docs/inference_acceleration.md.
Output per prompt i: `{i:06d}.mp4` + `{i:06d}.json` (settings), or
`{i:06d}.safetensors` with `--save-latents`. Every file is written atomically; outputs already in the save path
are refused unless `--overwrite`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError, check_input_path, check_output_dir, entry_point
from .arguments import InferenceArgs, build_config, parse_args
from .pipeline import LATENTS_KEY
from .runner import InferenceRunner

# What a run writes into the save path: refused when already there, unless --overwrite.
OUTPUT_NAME = re.compile(r"\d{6}\.(mp4|json|safetensors)|benchmark\.json")


def _check_latents(folder: str) -> None:
    """`--decode-latents`: a folder of readable latents files (a garbage `.safetensors` is named, not decoded)."""
    from safetensors import safe_open

    files = sorted(check_input_path("--decode-latents", folder, "dir").glob("*.safetensors"))
    if not files:
        raise UserError(f"--decode-latents {folder}: no *.safetensors latents in it; pass the --save-path of an "
                        "inference.py --save-latents run")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                ours = LATENTS_KEY in f.keys() and "record" in (f.metadata() or {})
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for any malformed header
            raise UserError(f"--decode-latents {path}: not a readable safetensors file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); remove it or rerun --save-latents") from e
        if not ours:
            raise UserError(f"--decode-latents {path}: not a latents file written by --save-latents (no "
                            f"'{LATENTS_KEY}' tensor or 'record' metadata); remove it from the folder")


def _check_prompt(source: str) -> None:
    """A prompt file (a `--prompt` or `prompt` that names an existing file) must be UTF-8 text with a prompt."""
    path = Path(source)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt {source}: not UTF-8 text (byte {e.start}); save the prompt file as UTF-8") from e
        if not text.strip():
            raise UserError(f"--prompt {source}: the prompt file has no non-blank line; write one prompt per line")


def check_paths(args: InferenceArgs) -> None:
    """Every input the flags and the inference JSON name exists and is of the right kind; outputs are not already
    there unless `--overwrite` (docs/reliability.md)."""
    cfg = build_config(args)
    decode_only = args.decode_latents is not None
    cfg.check_paths(args.config, text=not decode_only, vae=not args.save_latents)
    for flag, path, kind in (("--predictor-weights", args.predictor_weights, "any"), ("--lora", args.lora, "dir"),
                             ("--image", args.image, "file"), ("--last-image", args.last_image, "file"),
                             ("--video", args.video, "file")):
        if path is not None and not decode_only:
            check_input_path(flag, path, kind)
    if decode_only:
        _check_latents(args.decode_latents)
    else:
        _check_prompt(cfg.prompt)
    if args.benchmark and args.report is not None:
        report = Path(args.report)
        if report.is_dir() or (report.exists() and not args.overwrite):
            raise UserError(f"--report {report}: {'is a folder' if report.is_dir() else 'already exists'}; "
                            "choose a new file name or pass --overwrite")
        return
    check_output_dir("--save-path", cfg.save_path, overwrite=args.overwrite,
                     taken=lambda p: OUTPUT_NAME.fullmatch(p.name) is not None)


@entry_point("inference.py")
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse the flags, check the paths, run; errors per `errors.entry_point` (one line and exit 2 for bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    check_paths(args)
    InferenceRunner(args).run()


if __name__ == "__main__":
    main()
