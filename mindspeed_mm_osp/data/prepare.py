"""`prepare_dataset`: a folder of videos and images -> annotation JSON, data.txt and a data JSON, ready to train.

Files are probed (`data/probe.py`) in worker processes. Each finished probe goes into a progress file, rewritten
atomically every few seconds with each file's size and modification time: `resume` probes only the files not in
it (or changed since), and the outputs are built from the whole progress file in path order, so an interrupted
and resumed run writes exactly what an uninterrupted one does. Captions are matched at the end (not cached), so
editing them needs no new probe. `dry_run_report` runs training's own filter on a data JSON.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..io_atomic import atomic_write_text
from .index import NothingSurvivedError, drop_hint
from .probe import probe_file, read_caption_file, records_of, scan_folder, sidecar_caption

PROGRESS, ANNOTATION, DATA_TXT, REPORT, DATA_JSON = (
    "prepare_progress.json", "annotation.json", "data.txt", "unreadable.txt", "data.json")
OUTPUTS = (PROGRESS, ANNOTATION, DATA_TXT, REPORT, DATA_JSON)
SAVE_EVERY_S = 2.0


@dataclass
class PrepareOptions:
    folder: Path
    out: Path
    captions: Optional[Path] = None
    workers: int = 1
    split_frames: Optional[int] = None
    train_fps: float = 24.0
    resume: bool = False
    progress: bool = True
    stop_after: Optional[int] = None  # tests: stop after probing this many files, as an interrupted run
    data_json_template: Optional[Path] = None


@dataclass
class PrepareResult:
    complete: bool
    probed: int = 0  # files probed by this run (the rest came from the progress file)
    records: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)  # (path, reason)
    ignored: list = field(default_factory=list)
    captions: Counter = field(default_factory=Counter)  # source -> files
    kinds: Counter = field(default_factory=Counter)
    rotated: int = 0
    data_json: Optional[Path] = None


def _stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _probe_job(job: tuple[str, str]) -> tuple[str, dict]:
    folder, rel = job
    return rel, probe_file(os.path.join(folder, rel))


def _load_progress(opts: PrepareOptions) -> dict:
    """{relative path: {"stamp": [size, mtime_ns], "probe": {...}}} of a resumed run, else {}."""
    path = opts.out / PROGRESS
    if not opts.resume:
        return {}
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist, nothing to resume; run without --resume")
    saved = json.loads(path.read_text())
    if saved.get("folder") != str(opts.folder):
        raise UserError(f"--resume: {path} was written for the folder {saved.get('folder')}, not {opts.folder}; "
                        "give that folder or run without --resume")
    return saved["probed"]


def _save_progress(opts: PrepareOptions, probed: dict) -> None:
    atomic_write_text(opts.out / PROGRESS, json.dumps({"folder": str(opts.folder), "probed": probed}, indent=0,
                                                      sort_keys=True))


class _CountLine:
    """The progress line when tqdm is not installed: "probed N/M files", at most once a second."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.shown = total, enabled, 0, 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and (self.done == self.total or time.monotonic() - self.shown > 1.0):
            self.shown = time.monotonic()
            print(f"probed {self.done}/{self.total} files", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _CountLine(total, enabled)
    return tqdm(total=total, unit="file", desc="probing", file=sys.stderr, disable=not enabled)


def _probe_all(opts: PrepareOptions, todo: list[str], probed: dict) -> int:
    """Probe `todo` into `probed` (saved every SAVE_EVERY_S seconds and at the end); returns how many were done."""
    jobs = [(str(opts.folder), rel) for rel in todo]
    limit = len(jobs) if opts.stop_after is None else min(len(jobs), opts.stop_after)
    bar, done, saved = _progress_bar(len(jobs), opts.progress), 0, time.monotonic()
    pool = multiprocessing.get_context("fork").Pool(opts.workers) if opts.workers > 1 and limit > 1 else None
    try:
        results = pool.imap(_probe_job, jobs[:limit]) if pool else map(_probe_job, jobs[:limit])
        for rel, probe in results:
            probed[rel] = {"stamp": _stamp(opts.folder / rel), "probe": probe}
            done += 1
            bar.update(1)
            if time.monotonic() - saved > SAVE_EVERY_S:
                _save_progress(opts, probed)
                saved = time.monotonic()
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
        _save_progress(opts, probed)
    return done


def _captions(opts: PrepareOptions, media: list[str], result: PrepareResult) -> dict:
    """{path: caption} for `media`: the --captions file wins over a sidecar `.txt`; counts per source."""
    from_file = read_caption_file(opts.captions, opts.folder) if opts.captions else {}
    out = {}
    for rel in media:
        text = from_file.get(os.path.normpath(rel)) or None
        source = "captions file" if text else None
        if text is None:
            text = sidecar_caption(opts.folder, rel)
            source = "sidecar .txt" if text else "none"
        result.captions[source] += 1
        if text is not None:
            out[rel] = text
    unmatched = len(set(from_file) - {os.path.normpath(rel) for rel in media})
    if unmatched:
        result.captions["captions file entries naming no media file"] = unmatched
    return out


def _write_outputs(opts: PrepareOptions, probed: dict, media: list[str], result: PrepareResult) -> None:
    """Annotation records in path order, data.txt, the unreadable-files report and the data JSON."""
    captions = _captions(opts, [rel for rel in media if "error" not in probed[rel]["probe"]], result)
    for rel in media:
        probe = probed[rel]["probe"]
        result.kinds[probe["kind"] if "error" not in probe else "unreadable"] += 1
        if "error" in probe:
            result.unreadable.append((rel, probe["error"]))
            continue
        result.rotated += bool(probe.get("rotation"))
        result.records += records_of(rel, probe, captions.get(rel), opts.split_frames, opts.train_fps)
    anno = opts.out / ANNOTATION
    atomic_write_text(anno, json.dumps(result.records, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(opts.out / DATA_TXT, f"{opts.folder},{anno}\n")
    lines = [f"{rel}\t{why}" for rel, why in result.unreadable]
    lines += [f"{rel}\tignored: not a video or image extension" for rel in result.ignored]
    atomic_write_text(opts.out / REPORT, "# path (relative to the folder)\treason\n" + "".join(f"{x}\n" for x in lines))
    if opts.data_json_template is not None:
        result.data_json = write_data_json(opts.data_json_template, opts.out / DATA_JSON, opts.out / DATA_TXT)


def write_data_json(template: Path, path: Path, data_txt: Path) -> Path:
    """`template` (a data JSON) with `dataset_param.basic_parameters.data_path` set to `data_txt`, as `path`."""
    from ..config.data import load_data_config
    from ..config.loader import read_json

    doc = read_json(template)
    doc.setdefault("dataset_param", {}).setdefault("basic_parameters", {})["data_path"] = str(data_txt)
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    load_data_config(path)  # the template must be a valid data JSON
    return path


def run_prepare(opts: PrepareOptions) -> PrepareResult:
    """Probe (or resume probing) `opts.folder`; write the outputs unless stopped early (`stop_after`)."""
    if "," in str(opts.out):
        raise UserError(f"--out {opts.out}: must not contain a comma (data.txt lines split on the last comma)")
    media, other = scan_folder(opts.folder, skip=[opts.out])
    probed = _load_progress(opts)
    probed = {rel: v for rel, v in probed.items() if rel in set(media) and v["stamp"] == _stamp(opts.folder / rel)}
    todo = [rel for rel in media if rel not in probed]
    opts.out.mkdir(parents=True, exist_ok=True)
    done = _probe_all(opts, todo, probed)
    result = PrepareResult(complete=done == len(todo), probed=done, ignored=other)
    if result.complete:
        _write_outputs(opts, probed, media, result)
    return result


def dry_run_report(data_json: Path, global_batch_size: int) -> tuple[str, Optional[UserError]]:
    """(what training's filter keeps of `data_json` and why the rest goes, the error training would stop with)."""
    from ..config.data import load_data_config
    from .loader import build_index_from_config

    cfg = load_data_config(data_json)
    cfg.check_paths(str(data_json), tokenizers=False)
    error = None
    try:
        _, stats = build_index_from_config(cfg, global_batch_size=global_batch_size)
    except NothingSurvivedError as e:
        stats, error = e.stats, e
    pre = cfg.dataset_param.preprocess_parameters
    shapes = ", ".join(f"{s} ({n})" for s, n in sorted(stats.shapes.items(), key=lambda kv: -kv[1])) or "none"
    lines = [f"dry run of {data_json} at global batch size {global_batch_size} (the filter training runs):",
             f"  kept {stats.kept} of {stats.records_in} records: {stats.videos_kept}/{stats.videos_in} videos, "
             f"{stats.images_kept}/{stats.images_in} images, {stats.frames_from_videos} frames from videos",
             f"  sample shapes (frames x height x width): {shapes}"]
    drops = sorted(stats.reasons().items(), key=lambda kv: -kv[1])
    lines += ["  dropped:"] + [f"  {n:>8}  {reason}: {drop_hint(reason, pre, global_batch_size)}"
                              for reason, n in drops] if drops else ["  dropped: none"]
    return "\n".join(lines), error


__all__ = ["OUTPUTS", "PrepareOptions", "PrepareResult", "dry_run_report", "run_prepare", "write_data_json"]
