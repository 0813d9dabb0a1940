"""What `prepare_dataset` learns from a folder of media: one probe per file, captions, annotation records.

A probe never raises: a file PyAV or PIL cannot read (zero bytes, truncated, not a video, no video stream)
comes back with an `error` saying why, and the run goes on. Sizes are the displayed ones (a video's
display-matrix rotation and an image's EXIF orientation applied), which is what the readers decode
(`data/readers.py`). The frame count is the number of video packets in the file, so a file cut short after its
header was written is caught (header and file disagree) instead of failing at training time.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..errors import UserError
from . import frames as F
from .index import KIND_VIDEO, media_kind

CAPTION_COLUMNS = ("path", "caption")


def probe_video(path: str) -> dict:
    """{kind, height, width, fps, num_frames, duration, rotation, codec} of a video, or {kind, error}."""
    import av

    out = {"kind": "video"}
    try:
        with av.open(path) as container:
            if container.format.name == "image2" or container.format.name.endswith("_pipe"):
                return {**out, "error": f"a still picture ({container.format.name}) with a video extension"}
            if not container.streams.video:
                return {**out, "error": "no video stream"}
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            first = next(container.decode(stream), None)
            if first is None or not rate:
                return {**out, "error": "no decodable frame" if first is None else "no frame rate"}
            header, codec = stream.frames, stream.codec_context.name
            rotation, height, width = int(first.rotation), first.height, first.width
        with av.open(path) as container:
            count = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        return {**out, "error": f"not a readable video ({type(e).__name__}: {getattr(e, 'strerror', None) or e})"}
    if header > count:
        return {**out, "error": f"truncated: the header lists {header} frames, the file holds {count}"}
    if rotation % 180:
        height, width = width, height
    fps = float(rate)
    return {**out, "height": height, "width": width, "fps": round(fps, 6), "num_frames": count,
            "duration": round(count / fps, 6), "rotation": rotation % 360, "codec": codec}


# EXIF orientation -> counter-clockwise degrees of the upright picture (5 and 7 are mirrored 90/270 turns).
_EXIF_ROTATION = {3: 180, 5: 90, 6: 270, 7: 270, 8: 90}


def probe_image(path: str) -> dict:
    """{kind, height, width, rotation, codec} of an image (fully decoded, so a truncated one is caught)."""
    from PIL import Image

    out = {"kind": "image"}
    try:
        with Image.open(path) as im:
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            width, height, codec = im.width, im.height, (im.format or "").lower()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return {**out, "error": f"not a readable image ({type(e).__name__}: {getattr(e, 'strerror', None) or e})"}
    rotation = _EXIF_ROTATION.get(orientation, 0)
    if rotation % 180:
        height, width = width, height
    return {**out, "height": height, "width": width, "rotation": rotation, "codec": codec}


def probe_file(path: str) -> dict:
    """The probe of one media file by its extension; never raises (see the module docstring)."""
    if not os.path.isfile(path):
        return {"kind": "missing", "error": "not a file"}
    if os.path.getsize(path) == 0:
        kind = "video" if media_kind(path) == KIND_VIDEO else "image"
        return {"kind": kind, "error": "empty file (0 bytes)"}
    return probe_video(path) if media_kind(path) == KIND_VIDEO else probe_image(path)


def scan_folder(folder: Path, skip: Iterable[Path] = ()) -> tuple[list[str], list[str]]:
    """(media files, other files) under `folder`, relative and sorted; hidden entries, `.txt` captions and the
    folders in `skip` (the output folder) are left out."""
    skip = {p.resolve() for p in skip}
    media, other = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() not in skip)
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder)
            if name.startswith("."):
                continue
            if media_kind(name) is not None:
                media.append(rel)
            elif not name.lower().endswith(".txt"):
                other.append(rel)
    return sorted(media), sorted(other)


def _caption_key(folder: Path, path: str) -> str:
    p = Path(path)
    if p.is_absolute():
        p = Path(os.path.relpath(p, folder))
    return os.path.normpath(p)


def read_caption_file(path: Path, folder: Path) -> dict[str, str]:
    """{relative media path: caption} from a CSV with a `path,caption` header row or a JSONL of
    {"path": ..., "caption": ...} objects (`cap` is accepted for `caption`). Paths are relative to `folder`."""
    text = path.read_text(encoding="utf-8", errors="replace")
    out = {}
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[_caption_key(folder, rec["path"])] = str(rec.get("caption", rec.get("cap", "")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"--captions {path}:{lineno}: expected a JSON object with \"path\" and \"caption\", "
                                f"got {line[:80]!r}") from e
        return out
    rows = csv.DictReader(text.splitlines())
    if not rows.fieldnames or not set(CAPTION_COLUMNS) <= set(rows.fieldnames):
        raise UserError(f"--captions {path}: the first row must be the header 'path,caption' (a .csv), or use a "
                        f".jsonl of {{\"path\": ..., \"caption\": ...}} lines; got header {rows.fieldnames}")
    for row in rows:
        if row["path"]:
            out[_caption_key(folder, row["path"])] = row["caption"] or ""
    return out


def sidecar_caption(folder: Path, rel: str) -> Optional[str]:
    """The text of `name.txt` next to `name.ext`, stripped; None when absent or blank."""
    side = (folder / rel).with_suffix(".txt")
    if not side.is_file():
        return None
    text = side.read_text(encoding="utf-8", errors="replace").strip()
    return text or None


def clip_source_frames(split_frames: int, fps: float, train_fps: float) -> int:
    """Source frames of the longest clip that resamples to at most `split_frames` frames at `train_fps`."""
    interval = F.resample_interval(fps, train_fps)
    length = max(1, int(np.floor(split_frames * interval)))
    while length > 1 and int(F.num_candidates(length, interval)) > split_frames:
        length -= 1
    return length


def records_of(rel: str, probe: dict, caption: Optional[str], split_frames: Optional[int],
               train_fps: float) -> list[dict]:
    """Annotation records of one probed file: one, or one per clip of a video longer than `split_frames` at
    `train_fps` (clips of the same file, `cut` = [first, end) in source frames, `num_frames` = end - first)."""
    rec: dict = {"path": rel}
    if caption is not None:
        rec["cap"] = caption
    rec["resolution"] = {"height": probe["height"], "width": probe["width"]}
    if probe.get("rotation"):
        rec["rotation"] = probe["rotation"]
    if probe["kind"] == "image":
        return [rec]
    total, fps = probe["num_frames"], probe["fps"]
    length = clip_source_frames(split_frames, fps, train_fps) if split_frames else total
    if total <= length:
        return [{**rec, "num_frames": total, "fps": fps}]
    return [{**rec, "num_frames": min(first + length, total) - first, "fps": fps,
             "cut": [first, min(first + length, total)]} for first in range(0, total, length)]


__all__ = ["CAPTION_COLUMNS", "clip_source_frames", "probe_file", "probe_image", "probe_video",
           "read_caption_file", "records_of", "scan_folder", "sidecar_caption"]
