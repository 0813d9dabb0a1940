"""A dataset with 20% bad files (truncated, zero-byte, missing, wrongly named, too short, unreadable) trains
through one full epoch; every bad file is detected, retried on another sample, and counted in the log."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
from collections import Counter, defaultdict

import pytest

from mindspeed_mm_osp.tools.make_synthetic_dataset import write_image, write_video
from reliability_harness import log, run_ranks, train, train_argv

pytestmark = pytest.mark.slow

H, W, FRAMES = 64, 128, 24
GOOD_VIDEOS, GOOD_IMAGES = 20, 12


def _truncate(src, dst, keep: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def bad_dataset(tiny_assets, tmp_path_factory):
    """(data.json, {reason: set of injected paths}) for 25 videos and 15 images, 5 and 3 of them bad."""
    root = tmp_path_factory.mktemp("bad_data")
    video, short, image = root / "good.mp4", root / "short_src.mp4", root / "good.png"
    write_video(video, FRAMES, H, W)
    write_video(short, 8, H, W)
    write_image(image, H, W)
    records, bad = [], defaultdict(set)

    def add(name: str, kind: str, reason: str | None = None) -> None:
        rec = {"path": name, "cap": f"sample {name}", "resolution": {"height": H, "width": W}}
        if kind == "video":
            rec.update(num_frames=FRAMES, fps=24)
        records.append(rec)
        if reason:
            bad[reason].add(str(root / name))

    for i in range(GOOD_VIDEOS):
        shutil.copy(video, root / f"v{i:02d}.mp4")
        add(f"v{i:02d}.mp4", "video")
    for i in range(GOOD_IMAGES):
        shutil.copy(image, root / f"i{i:02d}.png")
        add(f"i{i:02d}.png", "image")
    _truncate(video, root / "truncated.mp4", 0.4)
    add("truncated.mp4", "video", "corrupt")
    (root / "zero.mp4").write_bytes(b"")
    add("zero.mp4", "video", "empty")
    add("missing.mp4", "video", "missing")
    shutil.copy(image, root / "png_named.mp4")
    add("png_named.mp4", "video", "corrupt")
    shutil.copy(short, root / "short.mp4")  # 8 frames on disk, 24 annotated
    add("short.mp4", "video", "short")
    shutil.copy(video, root / "mp4_named.jpg")
    add("mp4_named.jpg", "image", "corrupt")
    _truncate(image, root / "truncated.png", 0.5)
    add("truncated.png", "image", "corrupt")
    (root / "zero.jpg").write_bytes(b"")
    add("zero.jpg", "image", "empty")

    anno = root / "anno.json"
    anno.write_text(json.dumps(records))
    (root / "data.txt").write_text(f"{root},{anno}\n")
    cfg = json.loads(tiny_assets["data_json"].read_text())
    cfg["dataset_param"]["basic_parameters"]["data_path"] = str(root / "data.txt")
    cfg["dataloader_param"]["num_workers"] = 1  # counters travel from a worker process with the batches
    data_json = root / "data.json"
    data_json.write_text(json.dumps(cfg))
    return data_json, dict(bad), len(records)


def _train_with_stderr_to(rank, world_size, argv, path):
    """Train with the log (sys.stderr and fd 2, also those of the DataLoader worker this process forks) appended to
    `path`, whatever pytest's capture did to sys.stderr."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(fd, "w", buffering=1)
    return train(rank, world_size, argv)


def test_bad_files_are_skipped_and_counted(micro_assets, bad_dataset, tmp_path):
    data_json, injected, samples = bad_dataset
    log_file = tmp_path / "stderr.log"
    argv = train_argv(micro_assets, iters=1000, data_json=data_json)
    ok, out = run_ranks(_train_with_stderr_to, 1, argv, str(log_file))[0]
    assert ok, out
    # one batch per sample slot; --train-iters beyond one pass is cut to it (with a warning), not exhausted mid-run
    assert out["stop_reason"] == "train_iters reached" and out["iteration"] == samples
    text = log_file.read_text()
    failed_reads = re.findall(r"read failed \((\w+): (\S+?)(?: \(.*\))?\), reading another", text)
    summary = re.search(r"unreadable files skipped \(retried on other samples\): (\{.*\})", text)
    assert summary, text[-2000:]
    counters = ast.literal_eval(summary.group(1))
    assert len(set(failed_reads)) == len(failed_reads)  # each file logged once, every failure counted
    logged = Counter(reason for reason, _ in failed_reads)
    assert counters.keys() == logged.keys() and all(counters[r] >= logged[r] for r in logged), (counters, logged)
    detected = defaultdict(set)
    for reason, path in failed_reads:
        detected[reason].add(path)
    assert dict(detected) == injected
    assert {r: len(p) for r, p in injected.items()} == {r: len(p) for r, p in detected.items()}
    n_bad = sum(len(p) for p in injected.values())
    log(f"bad data: {n_bad}/{samples} files bad ({100 * n_bad / samples:.0f}%), injected files per reason "
        f"{ {r: len(p) for r, p in sorted(injected.items())} }, all detected; failed reads counted in the log "
        f"{counters} (a bad file drawn again as a retry counts again); trained {out['iteration']} iterations "
        f"(every sample slot) to data exhaustion")
