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
`{i:06d}.safetensors` with `--save-latents`. Every file is written atomically and none is ever deleted.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from .arguments import parse_args
from .runner import InferenceRunner


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse the flags and run; a user error (bad flag, config key, file) is one line on stderr and exit status 2."""
    from ..errors import user_errors

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        InferenceRunner(args).run()
    except (*user_errors(), FileNotFoundError) as e:
        print(f"inference.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
