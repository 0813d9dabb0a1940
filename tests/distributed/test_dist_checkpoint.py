"""The torch_dist checkpoint format on the real tiny training run: a TP=2 checkpoint resumes at another layout
with its optimizer, EMA and schedule state intact.

Global batch 2, micro-batch 1: the straight TP=2 run (DP=1) accumulates 2 micro-batches a step. Resumed after
step 3 at TP=1 x CP=2 (same DP=1) or at TP=1 x DP=2 (one micro-batch per DP rank, which trains the same samples
with the same keyed noise), each continues on the straight run's loss and gradient-norm curves (1e-5), and its
EMA, Adam moments and per-parameter steps after step 6 equal the straight run's. Moments reset at the resume
would differ by far more.
"""

import shutil

import pytest
import torch

from mindspeed_mm_osp.checkpoint.convert import full_state
from mindspeed_mm_osp.testing import run_distributed
from helpers import train_and_record, training_argv

pytestmark = pytest.mark.slow

TOL = dict(rtol=1e-5, atol=1e-5)
COMMON = ("--global-batch-size", "2", "--use-distributed-optimizer")
CP2 = ("--context-parallel-size", "2", "--context-parallel-algo", "ulysses_cp_algo")


def _run(assets, save, *extra, world=1, tp=1, cp=1, fmt="torch_dist"):
    argv = training_argv(assets, *COMMON, "--ckpt-format", fmt, "--save", str(save), *extra, iters=6, tp=tp)
    return run_distributed(train_and_record, world, argv, tp=tp, cp=cp, timeout=300)[0]


def _resume(assets, source, target, *extra, fmt="torch_dist", cp=1):
    """Two ranks (TP=1) resume `source` in a copy of it."""
    shutil.copytree(source, target)
    return _run(assets, target, "--load", str(target), *extra, world=2, fmt=fmt, cp=cp)


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """The straight TP=2 run (6 steps) and a TP=2 torch_dist checkpoint after 3 steps."""
    root = tmp_path_factory.mktemp("dist")
    straight = _run(tiny_assets, root / "straight", world=2, tp=2)
    _run(tiny_assets, root / "tp2", "--exit-interval", "3", world=2, tp=2)
    return root, straight


def _assert_same_state(found_root, expected_root):
    found, expected = full_state(found_root).state, full_state(expected_root).state
    assert found["iteration"] == expected["iteration"] == 6
    assert found["opt_param_scheduler"] == expected["opt_param_scheduler"]
    assert found["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    for name, entry in expected["optimizer"]["state"].items():
        assert entry.keys() == found["optimizer"]["state"][name].keys() and {"exp_avg", "exp_avg_sq"} <= set(entry)
        assert found["optimizer"]["state"][name]["step"] == entry["step"] == 6.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(found["optimizer"]["state"][name][key], entry[key], **TOL, msg=name)
    for section in ("model", "ema_model"):
        assert found[section].keys() == expected[section].keys()
        for key, value in expected[section].items():
            torch.testing.assert_close(found[section][key], value, **TOL, msg=f"{section} {key}")


def _assert_same_curves(found, expected):
    for key in ("losses", "grad_norms"):
        assert len(found[key]) == len(expected[key]) == 3
        torch.testing.assert_close(torch.tensor(found[key]), torch.tensor(expected[key]), **TOL)


def test_tp2_checkpoint_resumes_at_tp1_cp2_on_the_tp2_curve(tiny_assets, runs, tmp_path):
    root, straight = runs
    resumed = _resume(tiny_assets, root / "tp2", tmp_path / "cp2", *CP2, cp=2)
    _assert_same_curves(resumed, {k: v[3:] for k, v in straight.items()})
    _assert_same_state(tmp_path / "cp2", root / "straight")


def test_tp2_checkpoint_resumes_at_tp1_dp2_on_the_tp2_curve(tiny_assets, runs, tmp_path):
    root, straight = runs
    resumed = _resume(tiny_assets, root / "tp2", tmp_path / "dp2")
    _assert_same_curves(resumed, {k: v[3:] for k, v in straight.items()})
    _assert_same_state(tmp_path / "dp2", root / "straight")
