"""SIGKILL during a torch_dist save: the tracker names a complete checkpoint, every `iter_XXXXXXX` folder loads,
and resuming reproduces the uninterrupted run bit for bit.

The training process (2 tiny iterations, a torch_dist save after each) kills itself at one stage of the save of
iteration 1 or 2: after the plan (only `common.pt` in the temporary folder), after every shard and DCP's index are
written (no manifest yet), and after the folder got its final name (the tracker not yet moved). Its helper
processes (megatron's writer queue) are killed with it, as on a node loss.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from mindspeed_mm_osp.checkpoint.convert import full_state
from mindspeed_mm_osp.checkpoint.layout import ITER_DIR, read_tracker
from reliability_harness import SAVE_ITERS, log, run_ranks, start_ranks, train, train_argv

pytestmark = pytest.mark.slow

SAME = ("model", "ema_model", "optimizer", "opt_param_scheduler", "clip_state", "iteration", "consumed_train_samples")


def _argv(assets, save_dir: Path, *extra: str) -> list[str]:
    return train_argv(assets, "--ckpt-format", "torch_dist", "--save", str(save_dir), "--save-interval", "1", *extra,
                      iters=SAVE_ITERS)


def _train_and_die(rank, world_size, argv, iteration: int, point: str):
    """Train; SIGKILL this process at `point` of the torch_dist save of `iteration`."""
    from mindspeed_mm_osp.checkpoint import dist_format

    def die_at(it) -> None:
        if str(it) == str(iteration):
            import psutil

            for child in psutil.Process().children(recursive=True):  # they die with the node, too
                child.kill()
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "planned":
        write_now = dist_format._write_now
        dist_format._write_now = lambda pending: (die_at(pending.iteration), write_now(pending))
    elif point == "written":
        finalize = dist_format.PendingDistSave.finalize
        dist_format.PendingDistSave.finalize = lambda self: (die_at(self.iteration), finalize(self))[1]
    else:  # "renamed"
        replace_dir = dist_format.replace_dir
        dist_format.replace_dir = lambda tmp, path: (replace_dir(tmp, path), die_at(int(Path(path).name[5:])))
    return train(rank, world_size, argv)


@pytest.fixture(scope="module")
def reference(micro_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_reference")
    ok, out = run_ranks(train, 1, _argv(micro_assets, root))[0]
    assert ok, out
    return {"dir": root, "losses": out["losses"], "state": full_state(root).state}


@pytest.mark.parametrize("iteration, point", [(1, "planned"), (2, "written"), (1, "renamed"), (2, "renamed")])
def test_sigkill_during_dist_save_then_resume(micro_assets, tmp_path, reference, iteration, point):
    save_dir = tmp_path / "ckpt"
    ranks = start_ranks(_train_and_die, 1, _argv(micro_assets, save_dir), iteration, point)
    ranks.procs[0].join(240)
    ranks.reap()
    assert ranks.procs[0].exitcode == -signal.SIGKILL
    tracked = read_tracker(save_dir) or 0
    assert tracked == iteration - 1
    published = sorted(d.name for d in save_dir.iterdir() if ITER_DIR.match(d.name))
    for name in published:  # whatever has an iteration name is complete
        assert full_state(save_dir / name).state["iteration"] == int(name[len("iter_"):])
    log(f"kill-during-torch_dist-save {point}@{iteration}: tracker={tracked or 'none'} published={published}")

    ok, out = run_ranks(train, 1, _argv(micro_assets, save_dir, "--load", str(save_dir)))[0]
    assert ok, out
    assert out["losses"] == reference["losses"][tracked:]
    resumed = full_state(save_dir).state
    for key in SAME:
        assert _equal(resumed[key], reference["state"][key]), key


def _equal(a, b) -> bool:
    import torch

    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b
