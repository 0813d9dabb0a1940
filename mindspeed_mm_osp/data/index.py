"""Startup filter: annotation records → a compact, columnar index of trainable samples.

Each record is kept or dropped for exactly one reason (first failing check wins), counted per
reason (docs/data.md lists the checks in order and where they differ from the reference loader):

0. `path_outside_data_folder` — the annotation's `path` is absolute or climbs out of its data folder with
   `..` (a dataset from someone else must not make us read arbitrary files), unless the data JSON sets
   `basic_parameters.allow_paths_outside_data_folder`;
1. `unsupported_ext` — neither a video nor an image extension (case-insensitive);
2. `no_cap`, `no_resolution` (also `no_num_frames` for videos);
3. `{vid,img}_aspect_mismatch` — h/w outside `[min_h_div_w_ratio, max_h_div_w_ratio]`;
4. `{vid,img}_res_too_small` — area below `min_hxw`, or (force_resolution) below the
   no-upscale floor of the aspect crop; `{vid,img}_res_mismatch_stride` — multi-res bucket
   with a zero side;
5. videos: `too_long`, `fps_too_low`, `below_min_num_frames`, `too_short` (random drop of
   clips shorter than `num_frames` with probability `drop_short_ratio`), and
   `no_valid_frame_count` (three separate reasons, where the reference counts one);
6. `filter_minority` — the sample's shape has fewer than `min_samples_per_shape_factor × global_batch_size`
   members (a warning names the key when it drops any).

`DROP_HINTS` says, per reason, which data JSON key (or annotation field) decides it and what to change: the
error of an empty index names the key behind the most drops, and `prepare_dataset --dry-run` prints them all.

A record's `crop` (rows y0:y1, columns x0:x1) defines the resolution the checks use. Everything
is vectorised over numpy columns; the only per-record Python work is reading the dicts, and the
resolution plan is computed once per distinct source size — a million records filter in a few
seconds. The result keeps (start, interval, count) per video instead of a list of frame indices.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

import numpy as np
from PIL import Image

from ..config.data import PreprocessParameters
from . import frames as F
from .annotations import DATA_FOLDER_KEY
from .geometry import force_resolution_min_area, multires_bucket
from .readers import DatasetError

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv"})
# Everything PIL can open, lower-cased (no torchvision dependency in the data path).
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions()) - VIDEO_EXTENSIONS

KIND_VIDEO, KIND_IMAGE, KIND_VIDEO_FRAME = 0, 1, 2

COUNTER_NAMES = (
    "path_outside_data_folder", "unsupported_ext", "no_cap", "no_resolution", "no_num_frames",
    "vid_aspect_mismatch", "img_aspect_mismatch", "vid_res_too_small", "img_res_too_small",
    "vid_res_mismatch_stride", "img_res_mismatch_stride",
    "too_long", "fps_too_low", "below_min_num_frames", "too_short", "no_valid_frame_count",
    "filter_minority",
)


def media_kind(path: str) -> Optional[int]:
    """KIND_VIDEO / KIND_IMAGE by extension (case-insensitive), None if unsupported."""
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return KIND_VIDEO
    if ext in IMAGE_EXTENSIONS:
        return KIND_IMAGE
    return None


class SampleShape(NamedTuple):
    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass
class SampleIndex:
    """Surviving samples as parallel columns (picklable; shared by forked workers)."""

    paths: list[str]
    captions: list  # str or list[str] per sample
    kind: np.ndarray  # int8, KIND_*
    start: np.ndarray  # int64, first usable source frame (`cut[0]`)
    num_frames: np.ndarray  # int64, annotated usable length N
    interval: np.ndarray  # float64, resampling Δ
    crop: np.ndarray  # int32 (n, 4) x0, x1, y0, y1; -1 = none
    src_hw: np.ndarray  # int32 (n, 2) resolution the plan was made for (after crop)
    aesthetic: np.ndarray  # float64, NaN = none
    record: np.ndarray  # int64, position in the concatenated annotation list
    shape_id: np.ndarray  # int64 index into `shapes`
    shapes: list[SampleShape]

    def __len__(self) -> int:
        return len(self.paths)

    def shape(self, i: int) -> SampleShape:
        return self.shapes[int(self.shape_id[i])]

    def members(self) -> list[np.ndarray]:
        """Sample positions of every shape, in shape-id order."""
        order = np.argsort(self.shape_id, kind="stable")
        bounds = np.searchsorted(self.shape_id[order], np.arange(len(self.shapes) + 1))
        return [order[bounds[s]:bounds[s + 1]] for s in range(len(self.shapes))]

    def frame_indices(self, i: int, preprocess: PreprocessParameters, rng: np.random.Generator) -> np.ndarray:
        """Source frame indices of sample `i` for one read (random window drawn from `rng`)."""
        t = self.shape(i).frames
        if self.kind[i] == KIND_IMAGE:
            return np.zeros(1, dtype=np.int64)
        target = 1 if self.kind[i] == KIND_VIDEO_FRAME else preprocess.num_frames
        return F.sample_frame_indices(int(self.start[i]), int(self.num_frames[i]), float(self.interval[i]),
                                      target, t, preprocess.speed_factor, rng)


@dataclass
class FilterStats:
    records_in: int = 0
    malformed: int = 0
    counters: dict = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    videos_in: int = 0
    videos_kept: int = 0
    images_in: int = 0
    images_kept: int = 0
    frames_from_videos: int = 0
    kept: int = 0
    shapes: Counter = field(default_factory=Counter)
    aesthetic: dict = field(default_factory=dict)
    # Per input record (malformed ones excluded): index into COUNTER_NAMES of the reason it
    # was dropped, -1 if kept.
    reason: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    dropped: dict = field(default_factory=dict)  # the annotation reader's drops per reason (`malformed` in total)

    def reason_of(self, record: int) -> str:
        code = int(self.reason[record])
        return "kept" if code < 0 else COUNTER_NAMES[code]

    def reasons(self) -> dict:
        """Every non-zero drop count, reader and filter reasons together."""
        return {k: v for k, v in {**self.dropped, **self.counters}.items() if v}

    def summary(self) -> str:
        """One line for the default log: what was kept and the main drop reasons (the full table is `table()`)."""
        drops = sorted(self.reasons().items(), key=lambda kv: -kv[1])
        dropped = ", ".join(f"{k} {v}" for k, v in drops) or "none"
        return (f"{self.kept} of {self.records_in} records kept ({self.videos_kept}/{self.videos_in} videos, "
                f"{self.images_kept}/{self.images_in} images, {len(self.shapes)} shapes); dropped: {dropped}")

    def table(self) -> str:
        """Human-readable report: per-reason drops, kept ratios and the shape histogram."""
        def pct(a, b):
            return f"{100.0 * a / b:6.2f}%" if b else "   n/a"

        rows = [("records in", self.records_in, ""), ("malformed", self.malformed, pct(self.malformed, self.records_in))]
        rows += [(f"  {k}", v, pct(v, self.records_in)) for k, v in self.dropped.items() if k != "malformed"]
        rows += [(k, v, pct(v, self.records_in)) for k, v in self.counters.items()]
        rows += [("videos kept / in", f"{self.videos_kept}/{self.videos_in}", pct(self.videos_kept, self.videos_in)),
                 ("images kept / in", f"{self.images_kept}/{self.images_in}", pct(self.images_kept, self.images_in)),
                 ("frames from videos", self.frames_from_videos, ""),
                 ("samples kept", self.kept, pct(self.kept, self.records_in))]
        lines = [f"{'reason':<24}{'count':>16}{'share':>10}", "-" * 50]
        lines += [f"{k:<24}{v!s:>16}{p:>10}" for k, v, p in rows]
        lines += ["-" * 50, "shape (TxHxW)            samples"]
        lines += [f"{str(s):<24}{n:>16}" for s, n in sorted(self.shapes.items(), key=lambda kv: -kv[1])]
        if self.aesthetic:
            lines += ["-" * 50] + [f"aesthetic {k:<14}{v:>16.4g}" for k, v in self.aesthetic.items()]
        return "\n".join(lines)


class _Columns(NamedTuple):
    """Per-record annotation fields (missing values as 0 / NaN / -1); h and w are after the crop."""

    kind: np.ndarray
    has_cap: np.ndarray
    h: np.ndarray
    w: np.ndarray
    nf: np.ndarray
    fps: np.ndarray
    start: np.ndarray
    crop: np.ndarray
    aes: np.ndarray


def annotation_columns(records: list[dict]) -> _Columns:
    """One pass over the dicts → numpy columns (missing values as 0 / NaN / -1).

    Python lists are filled and converted once (writing numpy scalars one by one is ~3×
    slower); this loop is the only per-record Python work of the filter.
    """
    kind, has_cap, h, w, nf, fps, start, aes = [], [], [], [], [], [], [], []
    crops: dict[int, list] = {}
    kind_of: dict[str, int] = {}
    num = (int, float)
    for i, r in enumerate(records):
        p = r["path"]
        ext = p[p.rfind("."):].lower()
        k = kind_of.get(ext)
        if k is None:
            k = kind_of[ext] = {KIND_VIDEO: 0, KIND_IMAGE: 1}.get(media_kind("x" + ext), -1)
        kind.append(k)
        cap = r.get("cap")
        has_cap.append(cap.__class__ is str or (isinstance(cap, list) and len(cap) > 0))
        res = r.get("resolution")
        hh = ww = 0
        if res.__class__ is dict:
            hh, ww = res.get("height"), res.get("width")
            if not (isinstance(hh, num) and isinstance(ww, num) and hh == hh and ww == ww):
                hh = ww = 0
        h.append(hh)
        w.append(ww)
        c = r.get("crop")
        if c is not None and isinstance(c, (list, tuple)) and len(c) == 4:
            crops[i] = c
        v = r.get("num_frames")
        cut = r.get("cut") if isinstance(r.get("cut"), (list, tuple)) else None
        if cut and isinstance(v, num) and cut[1] is not None:
            v = min(v, cut[1] - cut[0])  # a clip never reads past its `cut` end
        nf.append(v if k == 0 and isinstance(v, num) and v == v else -1)
        v = r.get("fps")
        fps.append(v if isinstance(v, num) and v > 0 else 24.0)
        start.append(cut[0] if cut else 0)
        a = r.get("aesthetic", r.get("aes"))
        aes.append(a if isinstance(a, num) else np.nan)
    n = len(records)
    crop = np.full((n, 4), -1, np.int32)
    if crops:
        crop[list(crops)] = np.array(list(crops.values()), np.int32)
    h = np.array(h, np.float64).astype(np.int64)
    w = np.array(w, np.float64).astype(np.int64)
    has_crop = crop[:, 0] >= 0
    h = np.where(has_crop, crop[:, 3] - crop[:, 2], h)
    w = np.where(has_crop, crop[:, 1] - crop[:, 0], w)
    return _Columns(np.array(kind, np.int8), np.array(has_cap, bool), h, w,
                    np.array(nf, np.float64).astype(np.int64), np.array(fps, np.float64),
                    np.array(start, np.float64).astype(np.int64), crop, np.array(aes, np.float64))


def _outside_data_folder(records: list[dict]) -> np.ndarray:
    """Per record: its `path` (already joined to its data folder) is outside that folder, judged on the text of
    the path (an absolute path elsewhere, or `..` past the folder; links are not followed). Records without a
    folder pass."""
    out = np.zeros(len(records), bool)
    for i, r in enumerate(records):
        folder, path = r.get(DATA_FOLDER_KEY), r["path"]
        if not folder or (path.startswith(os.path.join(folder, "")) and ".." not in path):
            continue
        rel = os.path.relpath(os.path.normpath(path), os.path.normpath(folder))
        out[i] = rel == ".." or rel.startswith(".." + os.sep)
    return out


def _buckets(h: np.ndarray, w: np.ndarray, preprocess: PreprocessParameters, min_hxw: int):
    """Per-record (sample_h, sample_w, reason) with reason 0 ok, 1 too small, 2 stride mismatch."""
    sh = np.zeros(len(h), np.int64)
    sw = np.zeros(len(h), np.int64)
    reason = np.zeros(len(h), np.int8)
    if len(h) == 0:
        return sh, sw, reason
    uniq, inv = np.unique(np.stack([h, w], 1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    ush = np.zeros(len(uniq), np.int64)
    usw = np.zeros(len(uniq), np.int64)
    ureason = np.zeros(len(uniq), np.int8)
    for u, (hh, ww) in enumerate(uniq.tolist()):
        if preprocess.force_resolution:
            ush[u], usw[u] = preprocess.max_height, preprocess.max_width
            if hh * ww < force_resolution_min_area(hh, ww, preprocess.max_height, preprocess.max_width, min_hxw):
                ureason[u] = 1
        else:
            bh, bw = multires_bucket(hh, ww, preprocess.max_hxw, preprocess.force_5_ratio, preprocess.hw_stride)
            ush[u], usw[u] = bh, bw
            if bh <= 0 or bw <= 0:
                ureason[u] = 2
            elif bh * bw < min_hxw:
                ureason[u] = 1
    return ush[inv], usw[inv], ureason[inv]


def effective_min_hxw(preprocess: PreprocessParameters) -> int:
    """`min_hxw`, defaulting to `max_hxw // 4` as the reference does."""
    return preprocess.min_hxw if preprocess.min_hxw is not None else preprocess.max_hxw // 4


class _Filter:
    """Drops records for the first check they fail, counting each drop under its reason."""

    def __init__(self, stats: FilterStats, n: int):
        self.stats, self.alive = stats, np.ones(n, bool)
        stats.reason = np.full(n, -1, np.int8)

    def drop(self, mask: np.ndarray, name: str) -> None:
        hit = self.alive & mask
        self.stats.counters[name] += int(hit.sum())
        self.stats.reason[hit] = COUNTER_NAMES.index(name)
        self.alive &= ~hit


def _drop_unusable(f: _Filter, c: _Columns, preprocess: PreprocessParameters, min_hxw: int) -> None:
    """Unsupported files, missing fields, out-of-range aspect ratios and too-small resolutions."""
    is_vid, is_img = c.kind == KIND_VIDEO, c.kind == KIND_IMAGE
    f.drop(c.kind < 0, "unsupported_ext")
    f.drop(~c.has_cap, "no_cap")
    f.drop((c.h <= 0) | (c.w <= 0), "no_resolution")
    f.drop(is_vid & (c.nf <= 0), "no_num_frames")
    ratio = c.h / np.maximum(c.w, 1)
    bad_aspect = (ratio < preprocess.min_h_div_w_ratio) | (ratio > preprocess.max_h_div_w_ratio)
    f.drop(bad_aspect & is_vid, "vid_aspect_mismatch")
    f.drop(bad_aspect & is_img, "img_aspect_mismatch")
    small = c.h * c.w < min_hxw
    f.drop(small & is_vid, "vid_res_too_small")
    f.drop(small & is_img, "img_res_too_small")


def _drop_by_bucket(f: _Filter, c: _Columns, preprocess: PreprocessParameters, min_hxw: int):
    """(sample height, sample width) per record, dropping records whose bucket is empty or too small."""
    is_vid, is_img = c.kind == KIND_VIDEO, c.kind == KIND_IMAGE
    n = len(c.kind)
    sh, sw = np.zeros(n, np.int64), np.zeros(n, np.int64)
    pos = np.flatnonzero(f.alive)
    bh, bw, reason = _buckets(c.h[pos], c.w[pos], preprocess, min_hxw)
    sh[pos], sw[pos] = bh, bw
    r_all = np.zeros(n, np.int8)
    r_all[pos] = reason
    f.drop((r_all == 2) & is_vid, "vid_res_mismatch_stride")
    f.drop((r_all == 2) & is_img, "img_res_mismatch_stride")
    f.drop((r_all == 1) & is_vid, "vid_res_too_small")
    f.drop((r_all == 1) & is_img, "img_res_too_small")
    return sh, sw


def _drop_by_duration(f: _Filter, c: _Columns, preprocess: PreprocessParameters):
    """(frames per sample, resampling interval) per record, dropping videos by the temporal rules."""
    is_vid = c.kind == KIND_VIDEO
    R, Fn, sigma = preprocess.train_fps, preprocess.num_frames, preprocess.speed_factor
    f.drop(is_vid & (c.nf > preprocess.too_long_factor * (Fn * c.fps / R * sigma)), "too_long")
    interval = F.resample_interval(c.fps, R)
    f.drop(is_vid & (interval < 1), "fps_too_low")
    length = F.speed_up_length(F.num_candidates(np.maximum(c.nf, 0), interval), Fn, sigma)
    f.drop(is_vid & (length < preprocess.min_num_frames), "below_min_num_frames")
    short = np.flatnonzero(f.alive & is_vid & (length < Fn))
    # Drawn in record order from a dedicated seeded stream, as the reference does; only short clips draw.
    u = np.random.default_rng(preprocess.seed).random(len(short))
    rand_drop = np.zeros(len(c.kind), bool)
    rand_drop[short[u < preprocess.drop_short_ratio]] = True
    f.drop(rand_drop, "too_short")
    valid = F.valid_frame_count(np.minimum(length, Fn), preprocess.ae_stride_t, preprocess.sp_size,
                                preprocess.min_num_frames)
    t = np.where(is_vid, valid, 1)
    f.drop(t < 0, "no_valid_frame_count")
    return t, interval


def _group_shapes(f: _Filter, kind: np.ndarray, frames: np.ndarray, sh: np.ndarray, sw: np.ndarray, *,
                  use_img_from_vid: bool, min_per_shape: int):
    """(kept records, their kinds, shape ids, shapes) after the minority filter on the final shapes."""
    keep = np.flatnonzero(f.alive)
    kinds = kind[keep].astype(np.int8)
    if use_img_from_vid:
        vids = keep[kind[keep] == KIND_VIDEO]
        keep = np.concatenate([keep, vids])
        kinds = np.concatenate([kinds, np.full(len(vids), KIND_VIDEO_FRAME, np.int8)])
    frames_col = np.where(kinds == KIND_VIDEO, frames[keep], 1)
    key = (frames_col << 40) | (sh[keep] << 20) | sw[keep]
    uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    major = counts[inv] >= min_per_shape
    f.stats.counters["filter_minority"] = int((~major).sum())
    f.stats.reason[keep[~major]] = COUNTER_NAMES.index("filter_minority")
    keep, kinds, inv = keep[major], kinds[major], inv[major]
    used, shape_id = np.unique(inv, return_inverse=True)
    shapes = [SampleShape(int(k >> 40), int((k >> 20) & 0xFFFFF), int(k & 0xFFFFF)) for k in uniq[used]]
    return keep, kinds, shape_id.reshape(-1).astype(np.int64), shapes


def _summarize(stats: FilterStats, kinds: np.ndarray, shape_id: np.ndarray, shapes: list[SampleShape],
               aes: np.ndarray) -> None:
    """Kept counts per kind and shape, and the aesthetic-score summary of the input records."""
    stats.kept = len(kinds)
    stats.videos_kept = int((kinds == KIND_VIDEO).sum())
    stats.images_kept = int((kinds == KIND_IMAGE).sum())
    stats.frames_from_videos = int((kinds == KIND_VIDEO_FRAME).sum())
    stats.shapes = Counter({shapes[s]: int(c) for s, c in enumerate(np.bincount(shape_id, minlength=len(shapes)))})
    scores = aes[~np.isnan(aes)]
    if len(scores):
        stats.aesthetic = {"count": len(scores), "missing": int(np.isnan(aes).sum()),
                           "ge_5.75": int((scores >= 5.75).sum()), "le_4.5": int((scores <= 4.5).sum()),
                           "mean": float(scores.mean()), "std": float(scores.std()),
                           "min": float(scores.min()), "max": float(scores.max())}


def build_index(records: list[dict], preprocess: PreprocessParameters, *, global_batch_size: int,
                use_img_from_vid: bool = False, malformed: int = 0, dropped: Optional[dict] = None,
                first_dropped: Optional[str] = None,
                allow_paths_outside_data_folder: bool = False) -> tuple[SampleIndex, FilterStats]:
    """Filter `records` (from `load_annotations`; `dropped` its per-reason drops, `malformed` their total) and
    bucket the survivors.

    Raises DatasetError (one line: the counts, the reasons, the first dropped record) if nothing survives.
    """
    malformed = sum(dropped.values()) if dropped else malformed
    stats = FilterStats(records_in=len(records) + malformed, malformed=malformed,
                        dropped=dict(dropped or ({"malformed": malformed} if malformed else {})))
    c = annotation_columns(records)
    stats.videos_in, stats.images_in = int((c.kind == KIND_VIDEO).sum()), int((c.kind == KIND_IMAGE).sum())
    f = _Filter(stats, len(records))
    if not allow_paths_outside_data_folder:
        f.drop(_outside_data_folder(records), "path_outside_data_folder")
    min_hxw = effective_min_hxw(preprocess)
    _drop_unusable(f, c, preprocess, min_hxw)
    sh, sw = _drop_by_bucket(f, c, preprocess, min_hxw)
    frames, interval = _drop_by_duration(f, c, preprocess)
    min_per_shape = preprocess.min_samples_per_shape_factor * global_batch_size
    keep, kinds, shape_id, shapes = _group_shapes(f, c.kind, frames, sh, sw, use_img_from_vid=use_img_from_vid,
                                                  min_per_shape=min_per_shape)
    _summarize(stats, kinds, shape_id, shapes, c.aes)
    if len(keep) == 0:
        raise NothingSurvivedError(_nothing_survived(records, stats, first_dropped, preprocess, global_batch_size),
                                   stats)
    if stats.counters["filter_minority"]:
        logger.warning("filter_minority dropped %d samples: %s", stats.counters["filter_minority"],
                       drop_hint("filter_minority", preprocess, global_batch_size))
    index = SampleIndex(
        paths=[records[i]["path"] for i in keep.tolist()], captions=[records[i]["cap"] for i in keep.tolist()],
        kind=kinds, start=c.start[keep], num_frames=c.nf[keep], interval=np.asarray(interval)[keep],
        crop=c.crop[keep], src_hw=np.stack([c.h[keep], c.w[keep]], 1).astype(np.int32), aesthetic=c.aes[keep],
        record=keep.astype(np.int64), shape_id=shape_id, shapes=shapes)
    return index, stats


class NothingSurvivedError(DatasetError):
    """No record survived the filter; `stats` holds the counters (a dry run prints them)."""

    def __init__(self, message: str, stats: FilterStats):
        super().__init__(message)
        self.stats = stats


_PRE = "dataset_param.preprocess_parameters."
# Per drop reason: (what decides it, the rule, the fix); `{p}` is the PreprocessParameters, `{gbs}` the global
# batch size, `{min_hxw}` the effective min_hxw. Reasons of the annotation reader (malformed, bad_*) share one.
DROP_HINTS = {
    "path_outside_data_folder": ("dataset_param.basic_parameters.allow_paths_outside_data_folder=false",
                                 "the annotation path leaves the folder its data.txt line names",
                                 "keep the media inside that folder, or set the key to true"),
    "unsupported_ext": ("the annotation `path`", "the extension is neither a video nor an image one",
                        "convert the file or fix the path"),
    "no_cap": ("the annotation `cap`", "the record has no caption",
               "add captions (a .txt next to each file, or prepare_dataset --captions FILE)"),
    "no_resolution": ("the annotation `resolution`", "height or width missing or 0",
                      "rebuild the annotations with prepare_dataset"),
    "no_num_frames": ("the annotation `num_frames`", "a video without a frame count",
                      "rebuild the annotations with prepare_dataset"),
    "vid_aspect_mismatch": (_PRE + "min_h_div_w_ratio={p.min_h_div_w_ratio}, max_h_div_w_ratio={p.max_h_div_w_ratio}",
                            "height/width outside that range", "widen the range"),
    "vid_res_too_small": (_PRE + "min_hxw={min_hxw}", "fewer pixels than that (after the crop to max_height x "
                          "max_width when force_resolution)", "lower min_hxw, or use larger videos"),
    "vid_res_mismatch_stride": (_PRE + "max_hxw={p.max_hxw}, hw_stride={p.hw_stride}",
                                "the multi-resolution bucket has a zero side", "raise max_hxw or lower hw_stride"),
    "too_long": (_PRE + "too_long_factor={p.too_long_factor}",
                 "more than that many times the source frames of one {p.num_frames}-frame sample at "
                 "train_fps={p.train_fps}", "raise it, or cut long videos into clips (prepare_dataset --split-frames)"),
    "fps_too_low": (_PRE + "train_fps={p.train_fps}", "the video's fps is lower",
                    "lower train_fps to the videos' fps"),
    "below_min_num_frames": (_PRE + "min_num_frames={p.min_num_frames}", "fewer frames than that at train_fps",
                             "lower min_num_frames, or use longer videos"),
    "too_short": (_PRE + "drop_short_ratio={p.drop_short_ratio}",
                  "this share of the clips shorter than num_frames={p.num_frames} is dropped",
                  "set it to 0 to train them at fewer frames, or lower num_frames"),
    "no_valid_frame_count": (_PRE + "num_frames={p.num_frames}, ae_stride_t={p.ae_stride_t}, sp_size={p.sp_size}",
                             "no frame count of the form ae_stride_t*k+1 fits the clip",
                             "lower min_num_frames, or use longer videos"),
    "filter_minority": (_PRE + "min_samples_per_shape_factor={p.min_samples_per_shape_factor}",
                        "a sample shape (frames x height x width) with fewer than that x global_batch_size={gbs} "
                        "samples is dropped", "lower it (0 keeps every shape), or add samples of that shape"),
    "annotation_reader": ("the annotation records", "a field has the wrong type or an absurd value",
                          "fix the records the log names (or rebuild them with prepare_dataset)"),
}
DROP_HINTS["img_aspect_mismatch"] = DROP_HINTS["vid_aspect_mismatch"]
DROP_HINTS["img_res_too_small"] = DROP_HINTS["vid_res_too_small"]
DROP_HINTS["img_res_mismatch_stride"] = DROP_HINTS["vid_res_mismatch_stride"]


def drop_hint(reason: str, preprocess: PreprocessParameters, global_batch_size: int) -> str:
    """"KEY=VALUE: the rule; the fix" for one drop reason (`DROP_HINTS`)."""
    what, rule, fix = DROP_HINTS.get(reason, DROP_HINTS["annotation_reader"])
    values = dict(p=preprocess, gbs=global_batch_size, min_hxw=effective_min_hxw(preprocess))
    return f"{what.format(**values)}: {rule.format(**values)}; {fix}"


def _nothing_survived(records: list[dict], stats: FilterStats, first_dropped: Optional[str],
                      preprocess: PreprocessParameters, global_batch_size: int) -> str:
    """The one line of an empty index: the reason behind the most drops with its key, value and fix, then every
    count and the first dropped record."""
    dropped = np.flatnonzero(stats.reason >= 0)
    first = (f"{records[int(dropped[0])]['path']} ({stats.reason_of(int(dropped[0]))})" if len(dropped) else
             first_dropped or "none (no record at all)")
    reasons = stats.reasons()
    if not reasons:
        return f"no annotation record survived filtering: the annotation files hold no record; first dropped: {first}"
    top = max(reasons, key=reasons.get)
    return (f"no annotation record survived filtering: {stats.records_in} records in, the most ({reasons[top]}) "
            f"dropped as {top} by {drop_hint(top, preprocess, global_batch_size)}; all drops {reasons}; "
            f"first dropped: {first}")


class SamplePlan(NamedTuple):
    """What one sample will be, without touching its file (for feature extraction)."""

    position: int  # index into SampleIndex
    path: str
    caption: object
    shape: SampleShape
    frame_indices: np.ndarray


def plan_rng(seed: int, position: int) -> np.random.Generator:
    """RNG of sample `position`'s plan: `T2VDataset.load_video(position, plan_rng(seed, position))`
    decodes exactly the frames `iter_plans(..., seed)` listed for it."""
    return np.random.default_rng((seed, position))


def iter_plans(index: SampleIndex, preprocess: PreprocessParameters, seed: int) -> Iterator[SamplePlan]:
    """Every sample with its final (frames, h, w) and frame indices, reproducible by seed."""
    for i in range(len(index)):
        yield SamplePlan(i, index.paths[i], index.captions[i], index.shape(i),
                         index.frame_indices(i, preprocess, plan_rng(seed, i)))


__all__ = ["COUNTER_NAMES", "DROP_HINTS", "FilterStats", "IMAGE_EXTENSIONS", "KIND_IMAGE", "KIND_VIDEO",
           "KIND_VIDEO_FRAME", "NothingSurvivedError", "SampleIndex", "SamplePlan", "SampleShape", "VIDEO_EXTENSIONS",
           "annotation_columns", "build_index", "drop_hint", "effective_min_hxw", "iter_plans", "media_kind", "plan_rng"]
