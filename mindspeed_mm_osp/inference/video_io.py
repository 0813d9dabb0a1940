"""Writing generated videos: H.264 mp4 through PyAV, atomically, with a JSON sidecar.

A file appears under its final name only once it is complete (`io_atomic.atomic_write`), so an
interrupted job never leaves a truncated mp4 that looks finished, and a later failure never deletes
a good one. The same frames always give the same file (see `_x264_params`).
"""

from __future__ import annotations

import functools
import json
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..io_atomic import atomic_write, atomic_write_text


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video tensor, got shape {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Encode (T, H, W, 3) uint8 frames as H.264 (yuv420p) at `fps`; returns the final path."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sides
        frames = frames[:, : h - h % 2, : w - w % 2]
    return atomic_write(path, lambda f: _encode_h264(f, frames, fps, crf))


def _encode_h264(f: BinaryIO, frames: np.ndarray, fps: float, crf: int) -> None:
    import av

    with av.open(f, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # one x264 thread: frame-threaded encoding is not bit-reproducible from run to run
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", **_x264_params()}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@functools.lru_cache(maxsize=1)
def _x264_params() -> dict[str, str]:
    """x264's AVX-512 code in its lookahead (macroblock-tree rate control) reads memory it never wrote (libx264
    core 165 as PyAV ships it; measured at widths 48, 96, 320 and 832 pixels, not 128 or 640): the same frames then
    encode to different files, pixels off by up to ~20, depending on what the heap held before. Its AVX2 code does
    not, so on (Linux) CPUs with AVX-512 x264's SIMD is capped at AVX2, at the same speed; elsewhere x264 chooses."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    # everything x264's "AVX2" level switches on (lzcnt is "abm"), and AVX-512
    if {"avx2", "fma", "bmi1", "bmi2", "abm", "avx512f"} <= set(flags):
        return {"x264-params": "asm=AVX2"}
    return {}


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """A JSON sidecar or report (indented; paths and other objects as strings)."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str))


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """All frames (T, H, W, 3) uint8 and the stream's average fps (used by tests and tools)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
    return np.stack(frames), fps
