"""`inspect_dataset`: what a data JSON's annotations hold and what training will make of them.

Histograms of the annotated records (duration, frames after resampling to `train_fps`, resolution, aspect ratio,
caption length) and the shape buckets of the kept samples, which the grouped sampler cuts into global batches
(one shape per step; each shape's remainder short of a global batch is left out of an epoch). Records are read
and filtered by the training code itself (`load_annotations`, `build_index_from_config`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..config.data import DataConfig
from . import frames as F
from .annotations import load_annotations
from .index import KIND_IMAGE, KIND_VIDEO, FilterStats, NothingSurvivedError, annotation_columns

HIST_BINS = 8
TOP_RESOLUTIONS = 10


@dataclass
class DatasetFigures:
    videos: int = 0
    images: int = 0
    duration_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    resampled_frames: np.ndarray = field(default_factory=lambda: np.zeros(0))
    aspect: np.ndarray = field(default_factory=lambda: np.zeros(0))
    resolutions: Counter = field(default_factory=Counter)
    caption_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0))
    caption_unit: str = "words"
    truncated_captions: int = 0  # longer than model_max_length tokens (tokenizer only)
    stats: Optional[FilterStats] = None
    global_batch_size: int = 1


def _caption_lengths(captions: list[str], cfg: DataConfig) -> tuple[np.ndarray, str]:
    """Token counts with the configured T5 tokenizer when it loads, else whitespace-separated words."""
    tok_cfg = cfg.dataset_param.tokenizer_config
    if tok_cfg is not None and Path(tok_cfg.from_pretrained).is_dir():
        from ..models.text.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(tok_cfg)
        except (OSError, ValueError):
            tokenizer = None
        if tokenizer is not None:
            ids = tokenizer(captions, add_special_tokens=True)["input_ids"] if captions else []
            return np.array([len(x) for x in ids]), f"tokens ({Path(tok_cfg.from_pretrained).name} tokenizer)"
    return np.array([len(c.split()) for c in captions]), "words (no tokenizer could be loaded)"


def collect(cfg: DataConfig, global_batch_size: int) -> DatasetFigures:
    """The figures of `cfg`'s annotations and the buckets of what its filter keeps."""
    from .loader import build_index_from_config

    pre = cfg.dataset_param.preprocess_parameters
    try:
        stats = build_index_from_config(cfg, global_batch_size=global_batch_size)[1]
    except NothingSurvivedError as e:
        stats = e.stats
    reader_log = logging.getLogger(load_annotations.__module__)
    level = reader_log.level
    reader_log.setLevel(logging.ERROR)  # its warnings were logged once just above
    try:
        records = load_annotations(cfg.dataset_param.basic_parameters.data_path).records
    finally:
        reader_log.setLevel(level)
    c = annotation_columns(records)
    vid, media = c.kind == KIND_VIDEO, (c.kind == KIND_VIDEO) | (c.kind == KIND_IMAGE)
    vid_ok = vid & (c.nf > 0)
    out = DatasetFigures(videos=int(vid.sum()), images=int((c.kind == KIND_IMAGE).sum()), stats=stats,
                         global_batch_size=global_batch_size)
    out.duration_s = c.nf[vid_ok] / c.fps[vid_ok]
    out.resampled_frames = F.num_candidates(c.nf[vid_ok], F.resample_interval(c.fps[vid_ok], pre.train_fps))
    sized = media & (c.h > 0) & (c.w > 0)
    out.aspect = c.h[sized] / c.w[sized]
    out.resolutions = Counter(f"{h}x{w}" for h, w in zip(c.h[sized].tolist(), c.w[sized].tolist()))
    captions = [cap for r in records for cap in ([r["cap"]] if isinstance(r.get("cap"), str) else r.get("cap") or [])]
    out.caption_lengths, out.caption_unit = _caption_lengths(captions, cfg)
    if out.caption_unit.startswith("tokens"):
        out.truncated_captions = int((out.caption_lengths > cfg.dataset_param.model_max_length).sum())
    return out


def histogram(values: np.ndarray, bins: int = HIST_BINS) -> list[tuple[str, int]]:
    """(bin label, count) rows; integer-valued data gets integer edges."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return []
    counts, edges = np.histogram(values, bins=min(bins, max(1, len(np.unique(values)))))
    integral = np.all(values == np.round(values))
    fmt = (lambda x: f"{x:.0f}") if integral else (lambda x: f"{x:.3g}")
    return [(f"{fmt(a)} - {fmt(b)}", int(n)) for a, b, n in zip(edges[:-1], edges[1:], counts)]


def buckets(fig: DatasetFigures) -> list[tuple[str, int, int]]:
    """(shape, samples, global batches per epoch) of the kept samples, largest first."""
    shapes = fig.stats.shapes if fig.stats is not None else {}
    return [(str(s), n, n // fig.global_batch_size) for s, n in sorted(shapes.items(), key=lambda kv: -kv[1])]


def _section(title: str, rows: list[tuple[str, int]], width: int = 40) -> list[str]:
    top = max((n for _, n in rows), default=0) or 1
    return [title] + [f"  {label:>22} {n:>8}  {'#' * max(n > 0, round(width * n / top))}" for label, n in rows]


def text_report(fig: DatasetFigures, data_json: str) -> str:
    """The whole report as a text table."""
    s = fig.stats
    lines = [f"dataset {data_json}: {fig.videos} videos, {fig.images} images annotated",
             f"training's filter at global batch size {fig.global_batch_size}: {s.summary()}"]
    lines += _section("duration (seconds, videos)", histogram(fig.duration_s))
    lines += _section("frames after resampling to train_fps (videos)", histogram(fig.resampled_frames))
    lines += _section(f"resolution (height x width, {TOP_RESOLUTIONS} most common)",
                      fig.resolutions.most_common(TOP_RESOLUTIONS))
    lines += _section("aspect ratio (height / width)", histogram(fig.aspect))
    lines += _section(f"caption length in {fig.caption_unit}", histogram(fig.caption_lengths))
    if fig.truncated_captions:
        lines.append(f"  {fig.truncated_captions} captions are longer than model_max_length and get truncated")
    rows = buckets(fig)
    lines.append(f"sampler buckets (frames x height x width): samples, global batches of {fig.global_batch_size} "
                 "per epoch")
    lines += [f"  {shape:>22} {n:>8} {steps:>8}" for shape, n, steps in rows] or ["  none: nothing survives"]
    return "\n".join(lines)


def _bar(ax, title: str, rows: list[tuple[str, int]]) -> None:
    ax.bar(range(len(rows)), [n for _, n in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=45, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)


def write_png(fig: DatasetFigures, path: Path) -> Path:
    """One PNG with a panel per histogram (needs matplotlib: ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io_atomic import atomic_write

    canvas, axes = plt.subplots(2, 3, figsize=(15, 8))
    _bar(axes[0, 0], "duration (s)", histogram(fig.duration_s))
    _bar(axes[0, 1], "frames after resampling", histogram(fig.resampled_frames))
    _bar(axes[0, 2], "resolution (h x w)", fig.resolutions.most_common(TOP_RESOLUTIONS))
    _bar(axes[1, 0], "aspect ratio (h / w)", histogram(fig.aspect))
    _bar(axes[1, 1], f"caption length ({fig.caption_unit.split(' (')[0]})", histogram(fig.caption_lengths))
    _bar(axes[1, 2], "sampler buckets (samples)", [(shape, n) for shape, n, _ in buckets(fig)])
    canvas.tight_layout()
    try:
        atomic_write(path, lambda f: canvas.savefig(f, format="png", dpi=80))
    finally:
        plt.close(canvas)
    return path


__all__ = ["DatasetFigures", "buckets", "collect", "histogram", "text_report", "write_png"]
