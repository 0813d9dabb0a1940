"""One PNG with a row of evenly spaced frames per video, to compare videos at a glance (the demo's training clip,
its VAE reconstruction and a generated sample).

    python -m mindspeed_mm_osp.tools.compare_frames OUT.png --video "training clip=a.mp4" \\
        --video "generated=b.mp4" [--frames 5] [--height 96]

Every row is labelled and scaled to the same height (nearest neighbour, so pixels stay visible).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError, check_input_path, check_ranges, entry_point
from ..io_atomic import atomic_write

LABEL_WIDTH = 240
GAP = 4
RANGES = {"--frames": dict(low=1, high=64), "--height": dict(low=8, high=2048)}


def read_frames(path: str | Path) -> list[np.ndarray]:
    """Every frame of a video file as uint8 (H, W, 3)."""
    import av

    try:
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise UserError(f"--video {path}: cannot be read as a video ({exc})") from exc


def pick(frames: list[np.ndarray], count: int) -> list[np.ndarray]:
    """`count` frames evenly spaced from the first to the last (all of them when there are fewer)."""
    if len(frames) <= count:
        return frames
    return [frames[round(i * (len(frames) - 1) / (count - 1))] for i in range(count)] if count > 1 else frames[:1]


def row_image(label: str, frames: list[np.ndarray], height: int) -> Image.Image:
    tiles = [Image.fromarray(f).resize((max(1, round(f.shape[1] * height / f.shape[0])), height), Image.NEAREST)
             for f in frames]
    width = LABEL_WIDTH + sum(t.width + GAP for t in tiles)
    row = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(row).text((4, height // 2 - 6), label, fill="black")
    x = LABEL_WIDTH
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width + GAP
    return row


def compare(out: str | Path, videos: list[tuple[str, str]], frames: int = 5, height: int = 96) -> Path:
    """Write the comparison PNG of `videos` ((label, path) pairs) to `out`, atomically."""
    rows = [row_image(label, pick(read_frames(path), frames), height) for label, path in videos]
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + GAP for r in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height + GAP
    return atomic_write(Path(out), lambda f: sheet.save(f, format="PNG"))


def _labelled(spec: str) -> tuple[str, str]:
    label, sep, path = spec.rpartition("=")
    if not sep or not label:
        raise UserError(f"--video {spec!r}: expected LABEL=PATH")
    check_input_path("--video", path, "file")
    return label, path


@entry_point("compare_frames")
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--video", action="append", required=True, metavar="LABEL=PATH",
                   help="a video to show as one labelled row (repeat for more rows)")
    p.add_argument("--frames", type=int, default=5, help="frames per row, evenly spaced")
    p.add_argument("--height", type=int, default=96, help="height of every row in pixels")
    a = p.parse_args(argv)
    check_ranges({"--frames": a.frames, "--height": a.height}, RANGES)
    path = compare(a.out, [_labelled(v) for v in a.video], a.frames, a.height)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()


__all__ = ["compare", "pick", "read_frames", "row_image"]
