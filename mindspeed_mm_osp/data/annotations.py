"""data.txt and annotation files into plain record dicts.

`data.txt` ("combine" storage mode) lists one dataset per non-blank line as
`FOLDER,ANNOTATION_PATH`; each annotation file is a JSON array (`.json`) or one object per
line (`.jsonl`) of records with at least `path`, `cap` and `resolution` (videos also
`num_frames`, optional `fps`, `cut`, `crop`, `aesthetic`/`aes`).

Deviation from the reference loader (docs/data.md): the reference loads through pandas, which
turns a key missing from some records into NaN (a missing caption becomes the text "nan",
a missing resolution crashes). Here files are parsed with `json`, and a key that is
missing, `null` or NaN is simply absent from the record; the filter then counts it
(`no_cap`, `no_resolution`). A record that is not an object or has no string `path` is
"malformed": counted, logged with its file and index, and skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class LoadedAnnotations:
    records: list[dict]
    malformed: int = 0
    files: list[str] = field(default_factory=list)


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def parse_data_txt(data_path: str | Path) -> list[tuple[str, str]]:
    """`[(folder, annotation_path), ...]` in file order; blank lines are skipped."""
    entries = []
    for lineno, line in enumerate(Path(data_path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        # Split on the last comma so a folder containing commas still works (the reference crashes).
        folder, sep, anno = line.rpartition(",")
        if not sep or not anno.strip():
            raise ValueError(f"{data_path}:{lineno}: expected 'FOLDER,ANNOTATION_PATH', got {line!r}")
        entries.append((folder.strip(), anno.strip()))
    return entries


def _read_annotation_file(path: str) -> list:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: an annotation file must hold a JSON array of records")
    return data


def load_annotations(data_path: str | Path) -> LoadedAnnotations:
    """Load every annotation file listed in `data_path`; records are concatenated in order.

    Each record's `path` becomes `os.path.join(FOLDER, path)` (an absolute `path` wins, as
    in the reference). Absent optional fields are dropped from the dict rather than set to None/NaN.
    """
    out = LoadedAnnotations(records=[])
    for folder, anno_path in parse_data_txt(data_path):
        out.files.append(anno_path)
        bad_here = 0
        for i, rec in enumerate(_read_annotation_file(anno_path)):
            if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not rec["path"]:
                out.malformed += 1
                bad_here += 1
                if bad_here <= 10:
                    logger.warning("%s: record %d is malformed (not an object or no 'path'), skipped", anno_path, i)
                continue
            clean = {k: v for k, v in rec.items() if _present(v)}
            clean["path"] = os.path.join(folder, rec["path"])
            out.records.append(clean)
        if bad_here > 10:
            logger.warning("%s: %d malformed records skipped in total", anno_path, bad_here)
    return out


__all__ = ["LoadedAnnotations", "load_annotations", "parse_data_txt"]
