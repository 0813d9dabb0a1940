"""Turn a folder of your own videos and images into a dataset ready to train (docs/data.md, "Your own videos").

    python -m mindspeed_mm_osp.tools.prepare_dataset FOLDER --out OUT [--captions FILE] [--split-frames N]
    python -m mindspeed_mm_osp.tools.prepare_dataset --dry-run OUT/data.json [--global-batch-size N]

Writes OUT/annotation.json, OUT/data.txt (one `FOLDER,OUT/annotation.json` line), OUT/data.json (the template
data JSON pointing at it) and OUT/unreadable.txt (files that could not be used, with the reason). The dry run
prints how many samples training's filter keeps and which data JSON key drops the others.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config.data import load_data_config
from ..data.prepare import OUTPUTS, PrepareOptions, PrepareResult, dry_run_report, run_prepare
from ..errors import UserError, check_input_path, check_output_dir, check_ranges, entry_point

RELEASE_DATA_JSON = Path(__file__).resolve().parents[2] / "examples" / "opensoraplan1.5" / "data.json"
LAUNCHER = "examples/opensoraplan1.5/pretrain_opensoraplan1_5.sh"

# The valid range of every numeric flag (`errors.check_ranges`).
RANGES = {"--workers": dict(low=1, high=256), "--split-frames": dict(low=1, high=100000),
          "--train-fps": dict(low=0, high=1000, low_open=True), "--global-batch-size": dict(low=1, high=1 << 24),
          "--stop-after": dict(low=0)}


def build_parser() -> argparse.ArgumentParser:
    from ..training.arguments import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m mindspeed_mm_osp.tools.prepare_dataset",
                                description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("folder", nargs="?", help="folder of videos and images (searched recursively)")
    p.add_argument("--out", help="output folder: annotation.json, data.txt, data.json, unreadable.txt")
    p.add_argument("--captions", help="CSV with a 'path,caption' header, or JSONL of {\"path\", \"caption\"}; "
                   "wins over a sidecar NAME.txt next to NAME.mp4")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="probing processes")
    p.add_argument("--split-frames", type=int, help="cut longer videos into clips of at most this many frames at "
                   "--train-fps (annotation entries into the same file, no re-encoding)")
    p.add_argument("--train-fps", type=float, help="frame rate --split-frames counts at (default: train_fps of the "
                   "--data-json template, else 24)")
    p.add_argument("--data-json", help="template data JSON copied to OUT/data.json with its data_path set to "
                   "OUT/data.txt (default: the release's examples/opensoraplan1.5/data.json when present)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --out")
    p.add_argument("--overwrite", action="store_true", help="write into an --out that already holds outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", metavar="DATA_JSON", help="only report what training's filter keeps of DATA_JSON")
    p.add_argument("--global-batch-size", type=int, default=1, help="--dry-run: the training global batch size "
                   "(the minority filter depends on it)")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: an interrupted run
    return p


def _summary(opts: PrepareOptions, r: PrepareResult) -> list[str]:
    kinds = ", ".join(f"{r.kinds[k]} {name}" for k, name in (("video", "videos"), ("image", "images"),
                                                              ("unreadable", "unreadable")) if r.kinds[k])
    clips = sum(1 for rec in r.records if "cut" in rec)
    total = sum(r.kinds.values())
    resumed = f"; {total - r.probed} read from the progress file" if total > r.probed else ""
    lines = [f"{total} media files ({kinds}{resumed}), {len(r.ignored)} other files ignored",
             f"{len(r.records)} annotation records ({clips} clips cut from longer videos): "
             f"{opts.out / 'annotation.json'}",
             f"data.txt: {opts.out / 'data.txt'}",
             "captions: " + ", ".join(f"{n} {src}" for src, n in sorted(r.captions.items()))
             + (" (records without one are dropped by training as no_cap)" if r.captions["none"] else "")]
    if r.rotated:
        lines.append(f"{r.rotated} stored rotated: their resolution is the displayed (upright) size, "
                     "which is how training reads them")
    if r.unreadable or r.ignored:
        lines.append(f"{len(r.unreadable)} unreadable and {len(r.ignored)} ignored files, with the reason: "
                     f"{opts.out / 'unreadable.txt'}")
        lines += [f"  {rel}: {why}" for rel, why in r.unreadable[:10]]
    return lines


def _next_steps(opts: PrepareOptions, r: PrepareResult) -> list[str]:
    me = "python -m mindspeed_mm_osp.tools.prepare_dataset"
    if r.data_json is None:
        return ["next: set dataset_param.basic_parameters.data_path in your data JSON to "
                f"{opts.out / 'data.txt'}, then check it with:", f"  {me} --dry-run YOUR_DATA_JSON"]
    return [f"next: check what training keeps, then train (data JSON {r.data_json}):",
            f"  {me} --dry-run {r.data_json} --global-batch-size GBS",
            f"  MM_DATA={r.data_json} bash {LAUNCHER}"]


def _prepare(a: argparse.Namespace) -> None:
    if not a.folder or not a.out:
        raise UserError("give FOLDER and --out OUT (or --dry-run DATA_JSON)")
    check_input_path("FOLDER", a.folder, "dir")
    if a.captions:
        check_input_path("--captions", a.captions, "file")
    if a.data_json is None and RELEASE_DATA_JSON.is_file():
        a.data_json = str(RELEASE_DATA_JSON)
    if a.data_json:
        check_input_path("--data-json", a.data_json, "file")
    check_output_dir("--out", a.out, overwrite=a.overwrite or a.resume, taken=lambda p: p.name in OUTPUTS)
    if a.train_fps is None:
        a.train_fps = load_data_config(a.data_json).dataset_param.preprocess_parameters.train_fps if a.data_json \
            else 24.0
    opts = PrepareOptions(folder=Path(a.folder).resolve(), out=Path(a.out).resolve(),
                          captions=Path(a.captions) if a.captions else None, workers=a.workers,
                          split_frames=a.split_frames, train_fps=a.train_fps, resume=a.resume,
                          progress=not a.no_progress, stop_after=a.stop_after,
                          data_json_template=Path(a.data_json) if a.data_json else None)
    result = run_prepare(opts)
    if not result.complete:
        print(f"stopped after {result.probed} files; continue with --resume", flush=True)
        return
    print("\n".join(_summary(opts, result) + _next_steps(opts, result)), flush=True)


@entry_point("prepare_dataset")
def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    check_ranges({flag: getattr(a, flag[2:].replace("-", "_")) for flag in RANGES}, RANGES)
    if a.dry_run:
        check_input_path("--dry-run", a.dry_run, "file")
        text, error = dry_run_report(Path(a.dry_run), a.global_batch_size)
        print(text, flush=True)
        if error is not None:
            raise error
        return
    _prepare(a)


if __name__ == "__main__":
    main()
