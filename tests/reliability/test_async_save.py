"""`--async-save`: the files equal a synchronous save's, a SIGKILL at a random moment of a background save leaves
the previous checkpoint and a bit-exact resume, at most one save is in flight, and a failed background write
stops every rank with the same one-line error as a synchronous one."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from mindspeed_mm_osp.checkpoint import read_tracker, save_checkpoint
from mindspeed_mm_osp.checkpoint.async_save import AsyncSaves
from mindspeed_mm_osp.checkpoint.layout import CheckpointWriteError, iteration_dir, model_file
from mindspeed_mm_osp.checkpoint.reader import read_checkpoint
from mindspeed_mm_osp.testing import run_distributed
from reliability_harness import SAVE_ITERS, assert_same_training_state, check_survived, load_file, log, run_ranks
from reliability_harness import cli_main, sigkill_one_rank_when, start_ranks, train, train_argv
from test_disk_errors import _faulty_run

pytestmark = pytest.mark.slow


def _argv(assets, save_dir: Path, *extra: str, iters: int = SAVE_ITERS) -> list[str]:
    return train_argv(assets, "--save", str(save_dir), "--save-interval", "1", *extra, iters=iters)


@pytest.fixture(scope="module")
def straight(micro_assets, tmp_path_factory):
    """The uninterrupted run with synchronous saves after every iteration."""
    root = tmp_path_factory.mktemp("straight")
    ok, out = run_ranks(train, 1, _argv(micro_assets, root))[0]
    assert ok, out
    return {"dir": root, "losses": out["losses"]}


def test_async_save_writes_the_files_a_sync_save_writes(micro_assets, tmp_path, straight):
    save_dir = tmp_path / "ckpt"
    ok, out = run_ranks(train, 1, _argv(micro_assets, save_dir, "--async-save"))[0]
    assert ok, out
    assert out["losses"] == straight["losses"]
    assert read_tracker(save_dir) == SAVE_ITERS
    for it in range(1, SAVE_ITERS + 1):
        got, want = load_file(model_file(save_dir, it, 0)), load_file(model_file(straight["dir"], it, 0))
        assert got.keys() == want.keys()
        assert_same_training_state(got, want)
        assert got["rng_state"][0]["torch_rng_state"].equal(want["rng_state"][0]["torch_rng_state"])
        read_checkpoint(save_dir, it, verify=True)  # manifest present, sizes and checksums match
    paused = [line for line in out["log"].splitlines() if "training paused" in line]
    assert len(paused) == SAVE_ITERS and all("writing in the background" in line for line in paused)
    log("async save: " + " | ".join(line.split(": ", 1)[-1] for line in paused))


def _kill_async_save(assets, save_dir: Path, iteration: int, delay: float) -> tuple[bool, bool]:
    """Run with --async-save, SIGKILL the rank `delay` s after the background write of `iteration` began.
    Returns (the kill landed before that save was published, the writer outlived its rank)."""
    watched = model_file(save_dir, iteration, 0).parent
    proc = sigkill_one_rank_when(_argv(assets, save_dir, "--async-save"),
                                 lambda: watched.is_dir() and bool(os.listdir(watched)), delay)
    landed = proc.exitcode == -signal.SIGKILL and (read_tracker(save_dir) or 0) < iteration  # too late: retry
    partial = [n for n in os.listdir(watched) if ".tmp-" in n] if watched.is_dir() else []
    time.sleep(0.5)  # an orphaned writer would rename its file into place meanwhile
    outlived = bool(partial) and model_file(save_dir, iteration, 0).exists()
    return landed, outlived


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_during_async_save_then_resume_is_bit_exact(micro_assets, tmp_path, straight, seed):
    rng = random.Random(seed)
    iteration = 1 + seed % SAVE_ITERS
    delay = rng.uniform(0.0, 0.3)
    for attempt in range(6):
        save_dir = tmp_path / f"ckpt{attempt}"
        landed, outlived = _kill_async_save(micro_assets, save_dir, iteration, delay)
        assert not outlived, "the background writer went on after its rank was killed"
        if landed:
            break
        delay /= 2
    assert landed, f"no kill landed inside the async save of iteration {iteration}"
    tracked = check_survived(save_dir, straight)
    assert tracked == iteration - 1
    ok, out = run_ranks(train, 1, _argv(micro_assets, save_dir, "--load", str(save_dir), "--async-save"))[0]
    assert ok, out
    assert out["losses"] == straight["losses"][tracked:]
    assert_same_training_state(load_file(model_file(save_dir, SAVE_ITERS, 0)),
                               load_file(model_file(straight["dir"], SAVE_ITERS, 0)))
    log(f"async kill seed {seed}: iteration {iteration}, delay {1000 * delay:.0f} ms, attempt {attempt + 1}, "
        f"tracker {tracked or 'none'}, resumed bit-exact")


def _slow_writes(seconds: float) -> None:
    """Make this rank's checkpoint writes take `seconds` longer (the forked writer inherits it)."""
    from mindspeed_mm_osp.checkpoint import io as ckpt_io

    write = ckpt_io._write_payload

    def slow(obj, f) -> None:
        time.sleep(seconds)
        write(obj, f)

    ckpt_io._write_payload = slow


def _two_saves(rank: int, world_size: int, root: str) -> list:
    _slow_writes(0.5)
    saves, model = AsyncSaves(), torch.nn.Linear(4, 4)
    seen = []
    for it in (1, 2):
        save_checkpoint(root, it, model, async_saves=saves)
        seen.append((saves.in_flight, read_tracker(root), model_file(root, it, 0).exists()))
    saves.wait()
    seen.append((saves.in_flight, read_tracker(root), model_file(root, 2, 0).exists()))
    return seen


def test_at_most_one_save_in_flight(tmp_path):
    """Each save returns while its file is still being written; the second waits until the first is published."""
    for seen in run_distributed(_two_saves, 2, str(tmp_path), tp=2):
        assert seen == [(1, None, False), (2, 1, False), (None, 2, True)]


def test_failed_background_write_stops_every_rank(micro_assets, tmp_path):
    save_dir = tmp_path / "ckpt"
    argv = _argv(micro_assets, save_dir, "--tensor-model-parallel-size", "2", "--async-save", iters=3)
    results = run_ranks(_faulty_run, 2, argv, "enospc", 1)
    outs = {rank: out for rank, (ok, out) in results.items() if ok}
    assert sorted(outs) == [0, 1], results
    for rank, out in outs.items():
        assert out["code"] == 2, out["stderr"][-2000:]
        assert "pretrain.py: error: saving checkpoint iteration 2" in out["stderr"]
        assert "still names the previous checkpoint (1), left intact" in out["stderr"]
        assert "Traceback" not in out["stderr"]
    assert "No space left on device" in outs[1]["stderr"] and "mp_rank_01" in outs[1]["stderr"]
    assert "another rank failed to write its file" in outs[0]["stderr"]
    assert read_tracker(save_dir) == 1
    assert not iteration_dir(save_dir, 2).exists()


def test_write_error_of_a_dead_writer_is_reported(tmp_path):
    """A writer process that ends without a result (killed) fails the save instead of publishing it."""
    def die(rank, world_size, root):
        from mindspeed_mm_osp.checkpoint import io as ckpt_io

        ckpt_io._write_payload = lambda obj, f: os._exit(9)
        saves = AsyncSaves()
        save_checkpoint(root, 1, torch.nn.Linear(2, 2), async_saves=saves)
        try:
            saves.wait()
        except CheckpointWriteError as exc:
            return str(exc)
        return None

    message = run_distributed(die, 1, str(tmp_path))[0]
    assert message and "ended without reporting" in message
    assert read_tracker(tmp_path) is None


def test_async_save_with_the_distributed_optimizer_writes_what_a_sync_save_writes(micro_assets, tmp_path):
    """DP=2 with sharded optimizer state: the gather needs both ranks, so the snapshot is taken before the fork."""
    flags = ("--use-distributed-optimizer",)
    dirs = {kind: tmp_path / kind for kind in ("sync", "async")}
    for kind, save_dir in dirs.items():
        extra = flags + (("--async-save",) if kind == "async" else ())
        results = run_ranks(train, 2, _argv(micro_assets, save_dir, *extra))
        assert all(ok for ok, _ in results.values()) and len(results) == 2, results
    for it in range(1, SAVE_ITERS + 1):
        assert_same_training_state(load_file(model_file(dirs["async"], it, 0)), load_file(model_file(dirs["sync"], it, 0)))


def test_async_torch_dist_save_equals_a_sync_one(micro_assets, tmp_path, straight):
    """The torch_dist format's megatron request goes through the same queue: same losses, same checkpoint."""
    from mindspeed_mm_osp.checkpoint.convert import full_state

    dirs = {kind: tmp_path / kind for kind in ("sync", "async")}
    for kind, save_dir in dirs.items():
        extra = ("--ckpt-format", "torch_dist") + (("--async-save",) if kind == "async" else ())
        ok, out = run_ranks(train, 1, _argv(micro_assets, save_dir, *extra))[0]
        assert ok, out
        assert out["losses"] == straight["losses"]
    assert read_tracker(dirs["async"]) == SAVE_ITERS
    assert_same_training_state(full_state(dirs["async"]).state, full_state(dirs["sync"]).state)


def test_async_save_without_save_is_a_flag_error(capsys):
    from mindspeed_mm_osp.training.arguments import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--mm-data", "d.json", "--mm-model", "m.json", "--train-iters", "2", "--async-save"], world_size=1)
    assert exit_info.value.code == 2
    assert "--async-save needs --save DIR" in capsys.readouterr().err


def _cli(rank: int, world_size: int, argv: list[str]) -> dict:
    return cli_main(argv)


def test_a_stop_on_skipped_steps_publishes_the_pending_save(micro_assets, tmp_path):
    """Too many skipped steps: the last good state is saved in the background and published before the exit."""
    save_dir = tmp_path / "ckpt"
    argv = _argv(micro_assets, save_dir, "--async-save", "--inject-nonfinite-grad", "2:nan,3:nan",
                 "--max-consecutive-skips", "2", iters=6)
    ok, out = run_ranks(_cli, 1, argv)[0]
    assert ok and out["code"] == 3, out
    assert "the last good state was saved at iteration 3" in out["stderr"]
    assert read_tracker(save_dir) == 3
    read_checkpoint(save_dir, 3, verify=True)
    stopped, good = load_file(model_file(save_dir, 3, 0)), load_file(model_file(save_dir, 1, 0))
    assert_same_training_state({**stopped, "clip_state": None}, {**good, "clip_state": None})
