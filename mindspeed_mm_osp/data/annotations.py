"""data.txt and annotation files into plain, typed record dicts.

`data.txt` ("combine" storage mode) lists one dataset per non-blank line as
`FOLDER,ANNOTATION_PATH`; each annotation file is a JSON array (`.json`) or one object per
line (`.jsonl`) of records with at least `path`, `cap` and `resolution` (videos also
`num_frames`, optional `fps`, `cut`, `crop`, `aesthetic`/`aes`).

Every field the index reads goes through one typed, tolerant reader (`read_record`): a record whose
value has the wrong type or an absurd size (a crop box outside itself, an fps of 0 or 10^9, a
frame count of 10^30, a caption with undecodable bytes, ...) is dropped with a counted reason
(`DROP_REASONS`) and never stops the run. A key that is missing, `null` or NaN is simply absent, and
the filter counts the record (`no_cap`, `no_resolution`). Deviation from the reference loader
(docs/data.md): the reference loads through pandas, which turns a key missing from some records into
NaN (a missing caption becomes the text "nan", a missing resolution crashes).

A file that cannot be read at all (absent, not UTF-8 JSON, not an array) is refused with a
`DatasetError` naming it: that is a broken dataset, not a broken record.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import is_text
from .readers import DatasetError

logger = logging.getLogger(__name__)

# The key each record's data folder is kept under: the index drops paths that leave it (`data/index.py`).
DATA_FOLDER_KEY = "data_folder"

MAX_SIDE = 1 << 16  # pixels: larger is not a video frame (and would overflow the index's shape key)
MAX_FRAMES = 1 << 24  # frames of one clip (about a week at 24 fps)
MAX_FPS = 1000.0

# Why the reader drops a record (a record is dropped for its first bad field, in this order).
DROP_REASONS = ("malformed", "bad_path", "bad_cap", "bad_resolution", "bad_num_frames", "bad_fps", "bad_cut",
                "bad_crop", "bad_aesthetic")


@dataclass
class LoadedAnnotations:
    records: list[dict]
    dropped: Counter = field(default_factory=Counter)  # reader drops per reason (DROP_REASONS)
    files: list[str] = field(default_factory=list)
    first_dropped: Optional[str] = None  # "FILE record I (reason)" of the first drop, for error messages

    @property
    def malformed(self) -> int:
        """Records the reader dropped, all reasons together (the filter table's `malformed` row)."""
        return sum(self.dropped.values())


class _Bad(Exception):
    """A field's value is unusable; `args[0]` is the drop reason."""


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _text(value) -> bool:
    return isinstance(value, str) and is_text(value)


def _number(value, reason: str, low: float, high: float, integral: bool = False) -> float:
    """`value` as a number in [low, high] (an integer when `integral`), else _Bad(reason)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(reason)
    if not low <= value <= high or (integral and value != int(value)):
        raise _Bad(reason)
    return int(value) if integral else float(value)


def _path(value) -> str:
    if not _text(value) or not value or "\x00" in value:
        raise _Bad("bad_path")
    return value


def _caption(value):
    if isinstance(value, list):
        if not all(_text(c) for c in value):
            raise _Bad("bad_cap")
        return value
    if not _text(value):
        raise _Bad("bad_cap")
    return value


def _resolution(value) -> dict:
    """{height, width}, each an integer in [0, MAX_SIDE] or absent (0 and absent: the filter's no_resolution)."""
    if not isinstance(value, dict):
        raise _Bad("bad_resolution")
    out = {}
    for key in ("height", "width"):
        if _present(value.get(key)):
            out[key] = _number(value[key], "bad_resolution", 0, MAX_SIDE, integral=True)
    return out


def _cut(value) -> tuple[int, Optional[int]]:
    """[first, end]: first >= 0, end (null allowed) after first."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _Bad("bad_cut")
    first = _number(value[0], "bad_cut", 0, MAX_FRAMES, integral=True)
    end = None if value[1] is None else _number(value[1], "bad_cut", first + 1, MAX_FRAMES, integral=True)
    return first, end


def _crop(value) -> tuple[int, int, int, int]:
    """[x0, x1, y0, y1]: a non-empty box with non-negative corners inside MAX_SIDE."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise _Bad("bad_crop")
    x0, x1, y0, y1 = (_number(v, "bad_crop", 0, MAX_SIDE, integral=True) for v in value)
    if x1 <= x0 or y1 <= y0:
        raise _Bad("bad_crop")
    return x0, x1, y0, y1


FIELDS: dict[str, Callable] = {
    "path": _path,
    "cap": _caption,
    "resolution": _resolution,
    "num_frames": lambda v: _number(v, "bad_num_frames", 0, MAX_FRAMES, integral=True),
    "fps": lambda v: _number(v, "bad_fps", 1e-3, MAX_FPS),
    "cut": _cut,
    "crop": _crop,
    "aesthetic": lambda v: _number(v, "bad_aesthetic", -1e6, 1e6),
    "aes": lambda v: _number(v, "bad_aesthetic", -1e6, 1e6),
}


def read_record(rec) -> tuple[Optional[dict], Optional[str]]:
    """(the record with every known field typed and absent values left out, None) or (None, drop reason)."""
    if not isinstance(rec, dict) or not _present(rec.get("path")):
        return None, "malformed"
    clean = {key: value for key, value in rec.items() if key not in FIELDS and _present(value)}
    for key, parse in FIELDS.items():  # in DROP_REASONS order: a record is dropped for its first bad field
        if _present(rec.get(key)):
            try:
                clean[key] = parse(rec[key])
            except _Bad as bad:
                return None, bad.args[0]
    return clean, None


def _read_text(path: str | Path, what: str) -> str:
    """A text file that must exist; bytes that are not UTF-8 are kept as lone surrogates, so one bad caption
    drops one record (`bad_cap`) instead of the whole file."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{what} {path}: {'is a folder' if p.is_dir() else 'does not exist'}; "
                           "give an existing file")
    return p.read_bytes().decode("utf-8", errors="surrogateescape")


def parse_data_txt(data_path: str | Path) -> list[tuple[str, str]]:
    """`[(folder, annotation_path), ...]` in file order; blank lines are skipped."""
    entries = []
    for lineno, line in enumerate(_read_text(data_path, "data_path").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        # Split on the last comma so a folder containing commas still works (the reference crashes).
        folder, sep, anno = line.rpartition(",")
        if not sep or not anno.strip() or not _text(line):
            raise DatasetError(f"{data_path}:{lineno}: expected 'FOLDER,ANNOTATION_PATH' in UTF-8, got {line!r}")
        entries.append((folder.strip(), anno.strip()))
    return entries


def _read_annotation_file(path: str) -> list:
    """The records of one file; a `.jsonl` line that is not JSON becomes a malformed record (None)."""
    text = _read_text(path, "annotation file")
    if path.endswith(".jsonl"):
        out = []
        for line in text.splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    out.append(None)
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"annotation file {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; "
                           "fix or remove the file (one record per array element)") from e
    except RecursionError as e:
        raise DatasetError(f"annotation file {path}: JSON nested too deeply; expected an array of records") from e
    if not isinstance(data, list):
        raise DatasetError(f"annotation file {path}: must hold a JSON array of records, got {type(data).__name__}")
    return data


def load_annotations(data_path: str | Path) -> LoadedAnnotations:
    """Load every annotation file listed in `data_path`; records are concatenated in order.

    Each record's `path` becomes `os.path.join(FOLDER, path)` (an absolute `path` wins, as
    in the reference). Records the reader refuses are counted per reason and logged (the first ten per file).
    """
    out = LoadedAnnotations(records=[])
    entries = parse_data_txt(data_path)
    if not entries:
        raise DatasetError(f"data_path {data_path}: lists no annotation file; write one 'FOLDER,ANNOTATION_PATH' "
                           "line per dataset")
    for folder, anno_path in entries:
        out.files.append(anno_path)
        bad_here = Counter()
        for i, rec in enumerate(_read_annotation_file(anno_path)):
            clean, reason = read_record(rec)
            if clean is None:
                out.dropped[reason] += 1
                bad_here[reason] += 1
                if out.first_dropped is None:
                    out.first_dropped = f"{anno_path} record {i} ({reason})"
                if sum(bad_here.values()) <= 10:
                    logger.warning("%s: record %d dropped (%s), skipped", anno_path, i, reason)
                continue
            clean["path"] = os.path.join(folder, clean["path"])
            clean[DATA_FOLDER_KEY] = folder  # the index drops paths that leave it
            out.records.append(clean)
        if bad_here:
            logger.warning("%s: records dropped by the annotation reader: %s", anno_path, dict(bad_here))
    return out


__all__ = ["DROP_REASONS", "FIELDS", "LoadedAnnotations", "load_annotations", "parse_data_txt", "read_record"]
