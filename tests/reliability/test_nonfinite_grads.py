"""NaN/Inf gradients (`--inject-nonfinite-grad ITER:nan|inf`, written into one reduced gradient element after
the DP reduce) are skipped: weights, EMA, optimizer moments and LR schedule stay exactly as they were, the
skip is logged; too many in a row save the last good state and stop with exit code 3."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mindspeed_mm_osp.checkpoint.layout import model_file, read_tracker
from reliability_harness import (assert_same_training_state, assert_step_skipped, load_file, log, run_ranks, train,
                                 train_argv)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _argv(assets, save_dir, faults: str, *extra, iters: int):
    return train_argv(assets, "--save", str(save_dir), "--save-interval", "1", "--inject-nonfinite-grad", faults,
                      *extra, iters=iters)


SCHEDULES = [("2:nan,4:inf", 6, 2), ("1:inf,2:nan,5:nan,6:inf", 6, 3)]


@pytest.mark.parametrize("faults, iters, max_skips", SCHEDULES, ids=["isolated", "pairs-from-first-step"])
def test_nonfinite_gradients_are_skipped(micro_assets, tmp_path, faults, iters, max_skips):
    save_dir = tmp_path / "ckpt"
    ok, out = run_ranks(train, 1, _argv(micro_assets, save_dir, faults, "--max-consecutive-skips", str(max_skips),
                                        iters=iters))[0]
    assert ok, out
    bad = {int(item.split(":")[0]): item.split(":")[1] for item in faults.split(",")}
    assert out["iteration"] == iters and out["skipped"] == len(bad)
    for it, kind in bad.items():
        assert f"fault injection: {kind} gradient at iteration {it}" in out["log"]
        assert f"iteration {it} skipped:" in out["log"]
        if it > 1:
            assert_step_skipped(save_dir, it)
    for it in range(2, iters + 1):
        if it not in bad:  # and the good steps after a skip do update
            before, after = load_file(model_file(save_dir, it - 1, 0)), load_file(model_file(save_dir, it, 0))
            assert before["opt_param_scheduler"]["num_steps"] < after["opt_param_scheduler"]["num_steps"]
            assert any(not before["model"][k].equal(after["model"][k]) for k in before["model"])
    log(f"non-finite grads {faults} (limit {max_skips}): {len(bad)} injected, {out['skipped']} skipped, "
        f"state untouched at each, run finished at iteration {out['iteration']}")


def test_too_many_in_a_row_save_and_exit_3(micro_assets, tmp_path):
    """A real `python pretrain.py` process: three faults in a row with --max-consecutive-skips 3."""
    save_dir = tmp_path / "ckpt"
    argv = _argv(micro_assets, save_dir, "2:nan,3:inf,4:nan", "--max-consecutive-skips", "3", iters=8)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert ("pretrain.py: stopped: 3 consecutive iterations skipped for non-finite or extreme gradients "
            "(limit --max-consecutive-skips=3); the last good state was saved at iteration 4") in proc.stderr
    assert read_tracker(save_dir) == 4
    stopped, good = load_file(model_file(save_dir, 4, 0)), load_file(model_file(save_dir, 1, 0))
    assert_same_training_state({**stopped, "clip_state": None}, {**good, "clip_state": None})
    assert stopped["clip_state"]["consecutive_skips"] == 3
    log(f"non-finite grads 2:nan,3:inf,4:nan (limit 3): exit {proc.returncode} after {elapsed:.1f}s, "
        f"saved iteration 4 == state after iteration 1")
