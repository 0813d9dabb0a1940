"""SIGKILL while a checkpoint is being written: the tracker always names a complete checkpoint, and resuming
from it reproduces the uninterrupted run bit for bit.

Each trial forks one training process (2 tiny iterations, a save after each) and kills it during the save of
iteration 1 or 2, in two ways:

* external: the test process watches for the temp file of the atomic writer and sends SIGKILL after a random
  delay drawn over the write window measured on the uninterrupted run (kills land in the payload write, its
  fsync, the rename or the tracker update with the odds of their durations); a kill that came after the save
  finished is retried with half the delay, and the test asserts that the kill it checks landed inside the save;
* internal: the training process sends itself SIGKILL at one chosen point of the writer (after a random
  number of payload bytes, before/after each fsync and rename of the payload and of the tracker), so the
  short windows (tracker write, ~1 ms) are hit for sure.

SIGKILL runs no Python cleanup (`finally`, temp-file removal), exactly like a node loss.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from mindspeed_mm_osp.checkpoint.layout import MODEL_FILE, model_file, read_tracker
from reliability_harness import SAVE_ITERS, assert_same_training_state, check_survived, load_file, log, run_ranks
from reliability_harness import sigkill_one_rank_when, start_ranks, train, train_and_kill_self, train_argv

pytestmark = pytest.mark.slow

# Points of `io_atomic.atomic_write` where the internal trials kill, in the order a save passes them.
POINTS = ("payload_bytes", "payload_fsync", "payload_replace", "payload_replaced", "payload_dir_fsync",
          "tracker_fsync", "tracker_replace", "tracker_replaced")


def _argv(assets, save_dir: Path, *extra: str) -> list[str]:
    return train_argv(assets, "--save", str(save_dir), "--save-interval", "1", *extra, iters=SAVE_ITERS)


@pytest.fixture(scope="module")
def reference(micro_assets, tmp_path_factory):
    """The uninterrupted run (same flags, a save after every iteration) and the measured payload write window."""
    root = tmp_path_factory.mktemp("reference")
    ranks = start_ranks(train, 1, _argv(micro_assets, root))
    watched = model_file(root, SAVE_ITERS, 0).parent
    first_tmp = done = None
    while ranks.procs[0].is_alive() and done is None:
        names = os.listdir(watched) if watched.is_dir() else []
        now = time.monotonic()
        if first_tmp is None and any(".tmp-" in n for n in names):
            first_tmp = now
        if MODEL_FILE in names:
            done = now
        time.sleep(0.0002)
    results = ranks.results(240)
    ranks.reap()
    ok, out = results[0]
    assert ok, out
    window = (done - first_tmp) if first_tmp and done else 0.2
    size = model_file(root, SAVE_ITERS, 0).stat().st_size
    log(f"kill-during-save: payload {size} bytes, write window {window:.3f}s")
    return {"dir": root, "losses": out["losses"], "window": window, "payload_size": size}


def _resume_equals_reference(micro_assets, save_dir: Path, reference: dict, tracked: int) -> None:
    results = run_ranks(train, 1, _argv(micro_assets, save_dir, "--load", str(save_dir)))
    ok, out = results[0]
    assert ok, out
    assert out["iteration"] == SAVE_ITERS
    assert out["losses"] == reference["losses"][tracked:]
    assert_same_training_state(load_file(model_file(save_dir, SAVE_ITERS, 0)),
                               load_file(model_file(reference["dir"], SAVE_ITERS, 0)))


def _outcome(save_dir: Path, tracked: int, iteration: int) -> str:
    stale = sorted(p.name.split(".tmp-")[0].lstrip(".") for p in save_dir.rglob(".*.tmp-*"))
    return f"tracker={tracked or 'none'} stale_temp={stale or 'none'} killed_in_save_of={iteration}"


_rng = random.Random(20261123)
_BYTES = [round(_rng.random(), 3) for _ in range(4)]
# (iteration whose save is killed, point, fraction of the payload written for "payload_bytes")
INTERNAL = ([(2, p, 0.0) for p in POINTS if p != "payload_bytes"] + [(2, "payload_bytes", f) for f in _BYTES[:3]]
            + [(1, "payload_bytes", _BYTES[3]), (1, "tracker_fsync", 0.0)])
# These are resumed to the end and compared with the uninterrupted run; all are checked for completeness.
RESUMED = {INTERNAL[0], INTERNAL[3], INTERNAL[5], INTERNAL[7], INTERNAL[-1]}


@pytest.mark.parametrize("iteration, point, fraction", INTERNAL,
                         ids=[f"iter{i}-{p}" + (f"-{f:.2f}" if p == "payload_bytes" else "") for i, p, f in INTERNAL])
def test_sigkill_at_writer_point(micro_assets, tmp_path, reference, iteration, point, fraction):
    save_dir = tmp_path / "ckpt"
    ranks = start_ranks(train_and_kill_self, 1, _argv(micro_assets, save_dir), iteration, point, fraction,
                        reference["payload_size"])
    ranks.procs[0].join(240)
    assert ranks.procs[0].exitcode == -signal.SIGKILL
    tracked = check_survived(save_dir, reference)
    expected = iteration if point == "tracker_replaced" else iteration - 1
    assert tracked == expected
    log(f"kill-during-save internal {point}@{fraction:.2f}: {_outcome(save_dir, tracked, iteration)}")
    if (iteration, point, fraction) in RESUMED:
        _resume_equals_reference(micro_assets, save_dir, reference, tracked)


EXTERNAL_SEEDS = list(range(10))
EXTERNAL_ATTEMPTS = 6


def _kill_from_outside(micro_assets, save_dir: Path, iteration: int, delay: float) -> tuple[bool, int]:
    """Start training, SIGKILL it `delay` seconds after the save of `iteration` began (its temp or final payload
    file appeared). Returns (whether the kill landed inside that save, exit code): it did iff the process died
    by the signal before the tracker named `iteration`, the save's last step."""
    watched = model_file(save_dir, iteration, 0).parent
    proc = sigkill_one_rank_when(
        _argv(micro_assets, save_dir),
        lambda: watched.is_dir() and any(".tmp-" in n or n == MODEL_FILE for n in os.listdir(watched)), delay)
    return proc.exitcode == -signal.SIGKILL and read_tracker(save_dir) != iteration, proc.exitcode


@pytest.mark.parametrize("seed", EXTERNAL_SEEDS)
def test_sigkill_from_outside_at_random_time(micro_assets, tmp_path, reference, seed):
    """A kill at a random point of the measured write window; when it missed the save (it finished first), again
    with half the delay, so that every trial checks a save that was really interrupted."""
    rng = random.Random(seed)
    iteration = 1 if seed % 5 == 4 else 2
    delay = rng.uniform(0.0, reference["window"])
    for attempt in range(EXTERNAL_ATTEMPTS):
        save_dir = tmp_path / f"ckpt{attempt}"
        landed, exitcode = _kill_from_outside(micro_assets, save_dir, iteration, delay)
        if landed:
            break
        delay /= 2
    assert landed, f"no kill landed inside the save of iteration {iteration} in {EXTERNAL_ATTEMPTS} attempts"
    tracked = check_survived(save_dir, reference)
    assert tracked == iteration - 1
    log(f"kill-during-save external attempt {attempt + 1} delay {1000 * delay:.0f}ms exit {exitcode}: "
        f"{_outcome(save_dir, tracked, iteration)}")
    if seed < 5:
        _resume_equals_reference(micro_assets, save_dir, reference, tracked)


def test_next_save_removes_temp_files_of_killed_writers(tmp_path):
    import torch

    from mindspeed_mm_osp.checkpoint import save_checkpoint

    stale = model_file(tmp_path, 2, 0).parent / f".{MODEL_FILE}.tmp-999999"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial checkpoint of a killed run")
    save_checkpoint(tmp_path, 2, torch.nn.Linear(2, 2))
    assert not stale.exists()
