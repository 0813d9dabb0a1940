"""A checkpoint write that fails (disk full, I/O error) leaves the previous checkpoint as the latest, intact,
and stops training with exit code 2 and a message naming the file, the errno and the checkpoint kept.

Faults are injected inside the training process, only for the save of iteration `FAIL_AT` on one rank:
* `enospc`: the payload's temp file is opened on /dev/full, so the kernel itself answers ENOSPC;
* `eio_fsync` / `eio_rename`: `os.fsync` / `os.replace` of the payload raise EIO (no device here fails on cue);
* `enospc_tracker`: the tracker update (after every rank's file is complete) goes to /dev/full.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from mindspeed_mm_osp.checkpoint.layout import TRACKER_FILE, iteration_dir, model_file, read_tracker
from reliability_harness import assert_same_training_state, cli_main, load_file, log, run_ranks, train, train_argv

pytestmark = pytest.mark.slow

FAIL_AT = 2


def _install_fault(fault: str) -> None:
    """Make this process's checkpoint writer fail as `fault` says, for the save of iteration FAIL_AT only."""
    import builtins
    import os as real_os

    from mindspeed_mm_osp import io_atomic

    def hit(path) -> bool:
        path = Path(path)
        if fault == "enospc_tracker":  # the tracker update that follows the complete files of FAIL_AT
            return TRACKER_FILE in path.name and model_file(path.parent, FAIL_AT, 0).exists()
        return iteration_dir("", FAIL_AT).name in path.parts

    def fake_open(path, mode="r", *args, **kwargs):
        if fault in ("enospc", "enospc_tracker") and "w" in mode and hit(path):
            return builtins.open("/dev/full", mode, *args, **kwargs)
        return builtins.open(path, mode, *args, **kwargs)

    class Os:
        def __getattr__(self, name):
            return getattr(real_os, name)

        def fsync(self, fd):
            if fault == "eio_fsync" and hit(real_os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(errno.EIO, "Input/output error")
            return real_os.fsync(fd)

        def replace(self, src, dst):
            if fault == "eio_rename" and hit(dst):
                raise OSError(errno.EIO, "Input/output error", str(src), None, str(dst))
            return real_os.replace(src, dst)

    io_atomic.open = fake_open
    io_atomic.os = Os()


def _faulty_run(rank, world_size, argv, fault: str, fail_rank: int) -> dict:
    if rank == fail_rank:
        _install_fault(fault)
    return cli_main(argv)


def _argv(assets, save_dir, *extra):
    return train_argv(assets, "--save", str(save_dir), "--save-interval", "1", *extra, iters=3)


@pytest.fixture(scope="module")
def reference(micro_assets, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("reference")
    ok, out = run_ranks(train, 1, _argv(micro_assets, save_dir))[0]
    assert ok, out
    return save_dir


CASES = [("enospc", 1, 0), ("eio_fsync", 1, 0), ("eio_rename", 1, 0), ("enospc", 2, 1)]


@pytest.mark.parametrize("fault, world_size, fail_rank", CASES,
                         ids=[f"{f}-world{w}-rank{r}" for f, w, r in CASES])
def test_failed_write_keeps_previous_checkpoint_and_stops(micro_assets, tmp_path, reference, fault, world_size,
                                                          fail_rank):
    save_dir = tmp_path / "ckpt"
    tp = ["--tensor-model-parallel-size", str(world_size)]
    results = run_ranks(_faulty_run, world_size, _argv(micro_assets, save_dir, *tp), fault, fail_rank)
    assert sorted(results) == list(range(world_size))
    assert all(ok for ok, _ in results.values()), results
    outs = [results[rank][1] for rank in range(world_size)]
    for rank, out in enumerate(outs):
        assert out["code"] == 2, out["stderr"]
        assert "pretrain.py: error: saving checkpoint iteration 2" in out["stderr"]
        assert "still names the previous checkpoint (1), left intact" in out["stderr"]
        if rank == fail_rank:
            reason = "No space left on device" if fault.startswith("enospc") else "Input/output error"
            assert reason in out["stderr"] and f"mp_rank_{fail_rank:02d}" in out["stderr"]
        else:
            assert "another rank failed to write its file" in out["stderr"]
    assert read_tracker(save_dir) == 1
    assert not iteration_dir(save_dir, 2).exists()
    assert not [p for p in save_dir.rglob("*") if ".tmp-" in p.name]
    if world_size == 1:
        assert_same_training_state(load_file(model_file(save_dir, 1, 0)), load_file(model_file(reference, 1, 0)))
        ok, resumed = run_ranks(train, 1, _argv(micro_assets, save_dir, "--load", str(save_dir)))[0]
        assert ok, resumed
        assert_same_training_state(load_file(model_file(save_dir, 3, 0)), load_file(model_file(reference, 3, 0)))
    log(f"disk error {fault} world {world_size} failing rank {fail_rank}: exit codes "
        f"{[o['code'] for o in outs]}, tracker 1 kept, message: {_error_line(outs[fail_rank]['stderr'])}")


def _error_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("pretrain.py: error:"))


def test_failed_tracker_update_keeps_previous_checkpoint_and_stops(micro_assets, tmp_path):
    """Every rank's file of iteration 2 is complete, then the tracker update hits a full disk on rank 0."""
    save_dir = tmp_path / "ckpt"
    argv = _argv(micro_assets, save_dir, "--tensor-model-parallel-size", "2", "--distributed-timeout-minutes", "0.25")
    start = time.monotonic()
    results = run_ranks(_faulty_run, 2, argv, "enospc_tracker", 0, timeout=120)
    elapsed = time.monotonic() - start
    assert read_tracker(save_dir) == 1
    outs = {rank: out for rank, (ok, out) in results.items()}
    log(f"disk error enospc_tracker world 2: {elapsed:.1f}s, " + "; ".join(
        f"rank {r}: exit {o['code']} {o['stderr'].strip().splitlines()[-1][:200]}" for r, o in sorted(outs.items())))
    for rank in (0, 1):
        assert outs[rank]["code"] == 2, outs[rank]["stderr"][-2000:]
        assert "pretrain.py: error: saving checkpoint iteration 2" in outs[rank]["stderr"]
