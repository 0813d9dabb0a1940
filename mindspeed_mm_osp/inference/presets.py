"""Named output sizes: `--resolution 480p --aspect-ratio 9:16 --duration 5s` -> (frames, height, width).

Valid sizes follow the model's strides: frames = 8k+1 (WF-VAE time stride 8, causal first
frame) and height/width multiples of 16 (VAE stride 8 x predictor patch 2). A resolution
names the *short* side, as in "720p": 16:9 is landscape (H < W), 9:16 portrait. Rules:

* short side = the nominal value rounded to a multiple of 16, ties upward (360 -> 368,
  1080 -> 1088, the size H.264 itself codes a 1080p frame at);
* long side = nominal short side x ratio, rounded to a multiple of 16 (240p 16:9: 426.7 -> 432);
* `duration` in seconds becomes round(seconds x fps) frames, snapped to the nearest 8k+1 (ties
  upward): 5 s at 24 fps -> 121 frames. A frame count is taken as given and must already be 8k+1.

Anything else (an unknown resolution or ratio, a frame count not 8k+1) raises `ValueError`
naming the nearest valid size, so a typo never silently changes what is generated.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import NamedTuple, Optional

from ..models.ae.wfvae import SPATIAL_FACTOR, TEMPORAL_FACTOR

PATCH_SIZE = 2
SIDE_MULTIPLE = SPATIAL_FACTOR * PATCH_SIZE  # 16

# Nominal short side of each named resolution.
RESOLUTIONS: dict[str, int] = {
    "144p": 144, "240p": 240, "288p": 288, "360p": 360, "480p": 480, "576p": 576, "720p": 720, "1080p": 1080,
}
# (height, width) proportions.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "9:16": (16, 9), "16:9": (9, 16), "1:1": (1, 1), "3:4": (4, 3), "4:3": (3, 4),
}


class Duration(NamedTuple):
    """A `--duration` value: exactly one of seconds / frames is set."""

    seconds: Optional[float] = None
    frames: Optional[int] = None


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def nearest_frames(frames: float) -> int:
    """Nearest 8k+1 (>= 1), ties upward."""
    return max(0, _round_half_up((frames - 1) / TEMPORAL_FACTOR)) * TEMPORAL_FACTOR + 1


def nearest_side(side: float, multiple: int = SIDE_MULTIPLE) -> int:
    """Nearest positive multiple of `multiple`, ties upward."""
    return max(1, _round_half_up(side / multiple)) * multiple


def nearest_valid_size(frames: float, height: float, width: float,
                       multiple: int = SIDE_MULTIPLE) -> tuple[int, int, int]:
    """The closest (8k+1, multiple of `multiple`, multiple of `multiple`) size, each axis on its own."""
    return nearest_frames(frames), nearest_side(height, multiple), nearest_side(width, multiple)


def is_valid_size(frames: int, height: int, width: int, multiple: int = SIDE_MULTIPLE) -> bool:
    """frames = 8k+1 >= 1 and both sides positive multiples of `multiple` (16 = VAE 8 x patch 2)."""
    return (frames, height, width) == nearest_valid_size(frames, height, width, multiple)


def check_size(frames: int, height: int, width: int, multiple: int = SIDE_MULTIPLE) -> tuple[int, int, int]:
    """Return the size if valid, else raise ValueError naming the nearest valid one."""
    if not is_valid_size(frames, height, width, multiple):
        f, h, w = nearest_valid_size(frames, height, width, multiple)
        raise ValueError(f"size {frames}x{height}x{width} (frames x height x width) is not valid: frames must be "
                         f"{TEMPORAL_FACTOR}k+1 and height/width multiples of {multiple}; "
                         f"nearest valid size: {f}x{h}x{w}")
    return frames, height, width


def _nearest_resolution(short: float) -> str:
    """Preset whose nominal short side is closest to `short` pixels."""
    return min(RESOLUTIONS, key=lambda k: abs(RESOLUTIONS[k] - short))


def _nearest_resolution_text(resolution: str) -> str:
    """Nearest preset to a '500p'-like string ('576p' when unparsable)."""
    m = re.fullmatch(r"\s*(\d+)\s*p?\s*", resolution.lower())
    return _nearest_resolution(int(m.group(1))) if m else "576p"


def _nearest_aspect(height: float, width: float) -> str:
    """Preset ratio closest to height/width on a log scale (portrait and landscape symmetric)."""
    r = math.log(height / width)
    return min(ASPECT_RATIOS, key=lambda k: abs(math.log(ASPECT_RATIOS[k][0] / ASPECT_RATIOS[k][1]) - r))


def _nearest_aspect_text(aspect_ratio: str) -> str:
    """Nearest preset to a 'W:H' string such as '2:1' ('16:9' when unparsable)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[:x/]\s*(\d+(?:\.\d+)?)\s*", aspect_ratio)
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        return "16:9"
    return _nearest_aspect(float(m.group(2)), float(m.group(1)))


def _spatial(short: int, ratio_hw: tuple[int, int]) -> tuple[int, int]:
    rh, rw = ratio_hw
    long_side = nearest_side(short * max(rh, rw) / min(rh, rw))
    short_side = nearest_side(short)
    return (short_side, long_side) if rh <= rw else (long_side, short_side)


def _check_frames(frames: int) -> int:
    if frames < 1 or (frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"{frames} frames is not valid: frames must be {TEMPORAL_FACTOR}k+1; "
                         f"nearest valid: {nearest_frames(max(frames, 1))} frames")
    return frames


def _frames(duration: Optional[float], frames: Optional[int], fps: float, default: Optional[int]) -> int:
    if duration is not None and frames is not None:
        raise ValueError("give a duration in seconds or a frame count, not both")
    if frames is not None:
        return _check_frames(frames)
    if duration is not None:
        if not (duration > 0 and fps > 0):
            raise ValueError(f"duration and fps must be positive, got {duration} s at {fps} fps")
        return nearest_frames(duration * fps)
    if default is None:
        raise ValueError("a duration (seconds) or a frame count is required")
    return _check_frames(default)


def resolve_size(resolution: str, aspect_ratio: str, duration: Optional[float] = None,
                 frames: Optional[int] = None, fps: float = 24, default_frames: Optional[int] = None
                 ) -> tuple[int, int, int]:
    """(frames, height, width) for a named resolution and aspect ratio (see module docstring).

    `duration` is in seconds (converted with `fps`); `frames` must be 8k+1; with neither,
    `default_frames` is used. Unknown names raise ValueError with the nearest preset's size.
    """
    res_key, ar_key = resolution.strip().lower(), aspect_ratio.strip()
    problems = []
    if res_key not in RESOLUTIONS:
        problems.append(f"resolution {resolution!r} (choices: {', '.join(RESOLUTIONS)})")
        res_key = _nearest_resolution_text(resolution)
    if ar_key not in ASPECT_RATIOS:
        problems.append(f"aspect ratio {aspect_ratio!r} (choices: {', '.join(ASPECT_RATIOS)})")
        ar_key = _nearest_aspect_text(aspect_ratio)
    n = _frames(duration, frames, fps, default_frames)
    height, width = _spatial(RESOLUTIONS[res_key], ASPECT_RATIOS[ar_key])
    if problems:
        raise ValueError(f"unknown {' and '.join(problems)}; nearest valid preset: "
                         f"--resolution {res_key} --aspect-ratio {ar_key} = {n}x{height}x{width} (frames x H x W)")
    return n, height, width


def parse_duration(text: str) -> Duration:
    """'5', '5s', '2.5 s' -> seconds; '121f', '121 frames' -> frames (argparse `type=`)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(s|sec|secs|seconds?|f|frames?)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"duration {text!r}: use seconds ('5', '5s') or frames ('121f')")
    value, unit = m.group(1), m.group(2) or "s"
    if unit.startswith("f"):
        if "." in value:
            raise argparse.ArgumentTypeError(f"duration {text!r}: a frame count must be an integer")
        return Duration(frames=int(value))
    return Duration(seconds=float(value))


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """--resolution / --aspect-ratio / --duration; read back with `size_from_args`."""
    group = parser.add_argument_group("output size presets (override the config's input_size)")
    group.add_argument("--resolution", default=None, metavar="NAMEp",
                       help=f"named short side: {', '.join(RESOLUTIONS)}")
    group.add_argument("--aspect-ratio", default=None, metavar="W:H", help=f"one of {', '.join(ASPECT_RATIOS)}")
    group.add_argument("--duration", type=parse_duration, default=None, metavar="SECONDS|Nf",
                       help="length in seconds ('5', '5s'; snapped to the nearest 8k+1 frames at the output fps) "
                            "or frames ('121f', must be 8k+1)")


def size_from_args(args: argparse.Namespace, default: tuple[int, int, int], fps: float = 24) -> tuple[int, int, int]:
    """(frames, height, width) from the preset arguments, falling back to `default` per axis.

    Only --resolution: the default's aspect ratio (nearest preset) is kept; only --aspect-ratio:
    the default's short side (nearest preset) is kept; no --duration: the default's frames.
    Neither spatial flag: the default's height and width, unchanged. Raises ValueError.
    """
    frames_d, height_d, width_d = default
    duration: Optional[Duration] = getattr(args, "duration", None)
    seconds, frames = (duration.seconds, duration.frames) if duration is not None else (None, None)
    resolution, aspect_ratio = getattr(args, "resolution", None), getattr(args, "aspect_ratio", None)
    if resolution is None and aspect_ratio is None:
        return _frames(seconds, frames, fps, frames_d), height_d, width_d
    resolution = resolution or _nearest_resolution(min(height_d, width_d))
    aspect_ratio = aspect_ratio or _nearest_aspect(height_d, width_d)
    return resolve_size(resolution, aspect_ratio, duration=seconds, frames=frames,
                        fps=fps, default_frames=frames_d)


__all__ = ["ASPECT_RATIOS", "Duration", "RESOLUTIONS", "SIDE_MULTIPLE", "add_preset_arguments", "check_size",
           "is_valid_size", "nearest_valid_size", "parse_duration", "resolve_size", "size_from_args"]
