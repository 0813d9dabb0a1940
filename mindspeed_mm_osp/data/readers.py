"""Frame readers behind one interface: `reader.read(path, indices) -> uint8 [T, H, W, 3]` RGB.

`video_reader_type`: "decord" (package `decord2`, batched random access), "pyav" (seek to
the keyframe before the first wanted frame, decode forward, convert only wanted frames),
or "decoder" = decord when importable, else PyAV. Only the requested frames are converted.
Images go through PIL (`convert("RGB")`: alpha dropped, grey/palette expanded).

Frames come back as displayed: a video's display-matrix rotation (phones store portrait clips as landscape
frames plus a 90-degree rotation) and an image's EXIF orientation are applied, as decord does on its own; the
annotation's `resolution` is the displayed size (what `prepare_dataset` writes). A clip's frame indices are
absolute in the file (`cut[0]` + position), so a clip is read from inside the same file, never re-encoded.

decord2 3.4.0 mis-decodes some frame sizes (64×96 comes back with 4 channels and
`get_batch` fails); the decord reader then decodes that file with PyAV instead.

Failures raise `ReadError` with a reason (`missing`, `empty`, `corrupt`, `short`) that the
dataset counts and answers with a bounded retry on another sample of the same shape.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError


class DatasetError(UserError, ValueError):
    """The dataset as a whole is unusable (data.txt or an annotation file unreadable, no record survives the
    filter): one line naming the file, the counts and the first example."""


class NoReadableSampleError(UserError, RuntimeError):
    """Every file tried for a sample slot failed to read: the counts and the first failing path."""


class ReadError(UserError, RuntimeError):
    """A sample's file cannot deliver the requested frames; `reason` names why."""

    def __init__(self, reason: str, path: str, detail: str = ""):
        self.reason = reason
        self.path = path
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))


def check_file(path: str) -> None:
    if not os.path.exists(path):
        raise ReadError("missing", path)
    if os.path.getsize(path) == 0:
        raise ReadError("empty", path)


class VideoReader(Protocol):
    name: str

    def read(self, path: str, indices: np.ndarray) -> np.ndarray: ...


class PyAVReader:
    """PyAV: seek backward to a keyframe at or before the first index, decode forward.

    The index of a decoded frame is recovered from its pts and the stream's average rate
    (constant-frame-rate files, which is what the annotations' `fps` assumes).
    """

    name = "pyav"

    def read(self, path: str, indices: np.ndarray) -> np.ndarray:
        import av

        check_file(path)
        wanted = [int(i) for i in indices]
        need = sorted(set(wanted))
        got: dict[int, np.ndarray] = {}
        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                rate = stream.average_rate or stream.guessed_rate
                tb = stream.time_base
                t0 = stream.start_time or 0
                if need[0] > 0 and rate and tb:
                    container.seek(t0 + int(need[0] / rate / tb), stream=stream, backward=True)
                pos = rotation = 0
                last = need[-1]
                want = set(need)
                for frame in container.decode(stream):
                    idx = int(round(float((frame.pts - t0) * tb * rate))) if frame.pts is not None and rate else pos
                    pos, rotation = idx + 1, frame.rotation
                    if idx in want:
                        got[idx] = frame.to_ndarray(format="rgb24")
                    if idx >= last:
                        break
        except av.error.FFmpegError as e:
            raise ReadError("corrupt", path, str(e)) from e
        except (IndexError, ValueError) as e:  # e.g. no video stream
            raise ReadError("corrupt", path, str(e)) from e
        missing = [i for i in need if i not in got]
        if missing:
            raise ReadError("short", path, f"frames {missing[:3]}... not in file")
        # `rotation` is counter-clockwise degrees; np.rot90 turns counter-clockwise too (decord's output, exactly).
        return np.rot90(np.stack([got[i] for i in wanted]), k=round(rotation / 90) % 4, axes=(1, 2))


class DecordReader:
    """decord `VideoReader(..., num_threads=1)` + one `get_batch` of the wanted indices."""

    name = "decord"

    def __init__(self):
        import decord  # noqa: F401  (fail at construction, not in a worker)

        self._fallback = PyAVReader()

    def read(self, path: str, indices: np.ndarray) -> np.ndarray:
        import decord

        check_file(path)
        try:
            vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises its own error types on undecodable files
            raise ReadError("corrupt", path, str(e).splitlines()[0] if str(e) else type(e).__name__) from e
        n = len(vr)
        if len(indices) and int(np.max(indices)) >= n:
            raise ReadError("short", path, f"frame {int(np.max(indices))} requested, file has {n}")
        try:
            frames = vr.get_batch(list(map(int, indices))).asnumpy()
        except Exception:
            frames = None
        if frames is None or frames.shape[-1] != 3:
            # decord2 3.4.0 fails on some frame sizes that open fine (e.g. 64x96 comes back
            # with 4 channels); PyAV decodes those, and raises ReadError if truly corrupt.
            return self._fallback.read(path, indices)
        return frames


def make_video_reader(kind: str) -> VideoReader:
    """"decoder": decord if importable else PyAV; "decord" / "pyav": exactly that one."""
    if kind == "pyav":
        return PyAVReader()
    if kind == "decord":
        return DecordReader()
    if kind == "decoder":
        try:
            return DecordReader()
        except ImportError:
            return PyAVReader()
    raise ValueError(f"unknown video_reader_type {kind!r}; use 'decoder', 'decord' or 'pyav'")


def read_image(path: str) -> np.ndarray:
    """uint8 [1, H, W, 3] RGB through PIL, turned upright by its EXIF orientation."""
    check_file(path)
    try:
        with Image.open(path) as im:
            return np.array(ImageOps.exif_transpose(im).convert("RGB"))[None]
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ReadError("corrupt", path, str(e)) from e


__all__ = ["DecordReader", "PyAVReader", "ReadError", "VideoReader", "make_video_reader", "read_image"]
