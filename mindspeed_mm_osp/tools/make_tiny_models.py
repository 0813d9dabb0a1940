"""Write tiny random-weight WF-VAE, T5 and CLIP models (with tokenizers) as local folders.

`python -m mindspeed_mm_osp.tools.make_tiny_models OUT` produces

    OUT/vae/merged.ckpt   WF-VAE in the release checkpoint layout (a tiny config)
    OUT/t5/               T5EncoderModel + SentencePiece tokenizer (d_model 32)
    OUT/clip/             CLIPTextModelWithProjection + BPE tokenizer (projection 16)

which `examples/tiny/*.json` point at. They load through exactly the code paths that load
the released weights; only their size differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import platform
from ..errors import check_number, check_output_dir, entry_point

T5_DIM = 32
CLIP_PROJECTION = 16


def make_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    from ..models.ae import write_tiny_wfvae
    from ..models.text.tiny import write_tiny_clip, write_tiny_t5

    out = Path(out_dir)
    return {
        "vae": write_tiny_wfvae(out / "vae", seed=seed),
        "t5": write_tiny_t5(out / "t5", d_model=T5_DIM, seed=seed),
        "clip": write_tiny_clip(out / "clip", projection_dim=CLIP_PROJECTION, seed=seed),
    }


@entry_point("make_tiny_models")
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder (created; refused when it holds files, unless --overwrite)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="write into an OUT that already holds files")
    a = p.parse_args(argv)
    check_number("--seed", a.seed, low=0, high=2**32 - 1)
    check_output_dir("OUT", a.out, overwrite=a.overwrite)
    platform.silence_third_party()  # transformers' "Writing model shards" bars
    for name, path in make_tiny_models(a.out, a.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
