"""Extending a run: resuming with LR-schedule flags that differ from the checkpoint's (here a longer
--train-iters). Without a choice pretrain.py exits 2 with one line naming the flag, the checkpoint and both fixes,
in both checkpoint formats; --override-opt_param-scheduler continues on the flags' schedule and
--use-checkpoint-opt_param-scheduler on the checkpoint's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reliability_harness import cli_main, run_ranks, train_argv

LR, FIRST, SAVED, LONGER = 1e-4, 4, 2, 8  # the first run: --train-iters 4, saved and stopped at iteration 2
LINEAR = ("--lr-decay-style", "linear")


def _pretrain_main(rank, world_size, argv):
    return cli_main(argv)


def _run(argv: list[str]) -> dict:
    ok, out = run_ranks(_pretrain_main, 1, argv)[0]
    assert ok, out
    return out


def _save(assets: dict, root: Path, fmt: str) -> Path:
    out = _run(train_argv(assets, *LINEAR, "--save", str(root), "--save-interval", str(SAVED), "--exit-interval",
                          str(SAVED), "--ckpt-format", fmt, iters=FIRST))
    assert out["code"] == 0, out
    return root


@pytest.fixture(scope="module")
def checkpoints(micro_assets, tmp_path_factory):
    return {fmt: _save(micro_assets, tmp_path_factory.mktemp(fmt), fmt) for fmt in ("legacy", "torch_dist")}


def _lr_at(log: str, iteration: int) -> float:
    found = re.search(rf"iteration\s+{iteration}/\s*\d+ .*?learning rate: ([0-9.E+-]+)", log)
    assert found, log
    return float(found.group(1))


def _linear(steps: int, decay: int) -> float:
    """The LR megatron's linear schedule (no warm-up, --min-lr 0) gives after `steps` of `decay`."""
    return LR * (1 - steps / decay)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_changed_train_iters_exits_2_naming_the_flag_and_both_fixes(micro_assets, checkpoints, fmt):
    out = _run(train_argv(micro_assets, *LINEAR, "--load", str(checkpoints[fmt]), iters=LONGER))
    assert out["code"] == 2, out
    assert "Traceback" not in out["stderr"], out["stderr"]
    line = out["stderr"].strip().splitlines()[-1]
    assert line.startswith("pretrain.py: error: "), line
    for part in (f"--train-iters {LONGER} (checkpoint: {FIRST})", "--override-opt_param-scheduler",
                 "--use-checkpoint-opt_param-scheduler", str(checkpoints[fmt] / f"iter_{SAVED:07d}")):
        assert part in line, line


@pytest.mark.parametrize("flag, decay", [("--override-opt_param-scheduler", LONGER),
                                         ("--use-checkpoint-opt_param-scheduler", FIRST)])
def test_the_chosen_schedule_continues_from_the_checkpoint(micro_assets, checkpoints, flag, decay):
    """The LR logged at the first resumed iteration (the log shows it after that iteration's scheduler step) is
    the chosen schedule's: 6.25e-5 on the flags' 8-iteration decay, 2.5e-5 on the checkpoint's 4."""
    out = _run(train_argv(micro_assets, *LINEAR, "--load", str(checkpoints["legacy"]), flag, "--exit-interval",
                          str(SAVED + 1), iters=LONGER))
    assert out["code"] == 0, out
    assert _lr_at(out["log"], SAVED + 1) == pytest.approx(_linear(SAVED + 1, decay), rel=1e-6)


@pytest.mark.parametrize("flag", ["--no-load-optim", "--finetune"])
def test_a_fresh_optimizer_takes_the_flags_schedule_without_asking(micro_assets, checkpoints, flag):
    out = _run(train_argv(micro_assets, *LINEAR, "--load", str(checkpoints["legacy"]), flag, "--exit-interval", "1",
                          iters=LONGER))
    assert out["code"] == 0, out
