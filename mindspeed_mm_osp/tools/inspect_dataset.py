"""Report on a training data JSON's annotations: counts, histograms and the sampler's shape buckets.

    python -m mindspeed_mm_osp.tools.inspect_dataset DATA_JSON [--global-batch-size N] [--png PATH]

Prints a text table (duration, frames after resampling to train_fps, resolution, aspect ratio, caption length in
tokens of the configured tokenizer, or in words when it cannot be loaded, and the buckets the grouped sampler
forms) and draws the same figures into one PNG when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import check_input_path, check_ranges, entry_point

# The valid range of every numeric flag (`errors.check_ranges`).
RANGES = {"--global-batch-size": dict(low=1, high=1 << 24)}


def build_parser() -> argparse.ArgumentParser:
    from ..training.arguments import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m mindspeed_mm_osp.tools.inspect_dataset",
                                description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("data_json", help="the data JSON training reads (--mm-data)")
    p.add_argument("--global-batch-size", type=int, default=1,
                   help="the training global batch size (the minority filter and the batches per bucket)")
    p.add_argument("--png", help="where to draw the figures (default: DATA_JSON's name with _report.png)")
    p.add_argument("--no-png", action="store_true", help="only the text table")
    return p


@entry_point("inspect_dataset")
def main(argv=None) -> None:
    from ..config.data import load_data_config
    from ..data.inspection import collect, text_report, write_png

    a = build_parser().parse_args(argv)
    check_ranges({"--global-batch-size": a.global_batch_size}, RANGES)
    check_input_path("DATA_JSON", a.data_json, "file")
    cfg = load_data_config(a.data_json)
    cfg.check_paths(a.data_json, tokenizers=False)
    figures = collect(cfg, a.global_batch_size)
    print(text_report(figures, a.data_json), flush=True)
    if a.no_png:
        return
    png = Path(a.png) if a.png else Path(a.data_json).with_name(Path(a.data_json).stem + "_report.png")
    try:
        write_png(figures, png)
    except ImportError:
        print("inspect_dataset: no PNG drawn: matplotlib is not installed (pip install matplotlib); the table above "
              "holds the same figures", file=sys.stderr, flush=True)
        return
    print(f"figures: {png}", flush=True)


if __name__ == "__main__":
    main()
