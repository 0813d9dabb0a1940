"""A global batch trains the same whatever its DP split: TP=1 x DP=2 with GA=1 equals TP=1 x DP=1 with GA=2 (global
batch 2, micro-batch 1) over 3 steps, losses, gradient norms and weights to 1e-5. It fails if the noise or the VAE
posterior draw depends on the DP rank, or if DP rank r's micro-batch is not the samples DP=1 trains at that place."""

import pytest
import torch

from mindspeed_mm_osp.testing import run_distributed
from helpers import train_and_record, training_argv

pytestmark = pytest.mark.slow

TOL = dict(rtol=1e-5, atol=1e-5)


def _run(assets, world, *extra):
    argv = training_argv(assets, "--global-batch-size", "2", *extra, iters=3)
    return run_distributed(train_and_record, world, argv, True, tp=1, timeout=240)


@pytest.fixture(scope="module")
def dp1_ga2(tiny_assets):
    return _run(tiny_assets, 1)[0]


@pytest.mark.parametrize("extra", [(), ("--use-distributed-optimizer",)], ids=["plain", "distopt"])
def test_dp2_ga1_equals_dp1_ga2(tiny_assets, dp1_ga2, extra):
    dp2 = _run(tiny_assets, 2, *extra)
    assert dp2[0]["losses"] == dp2[1]["losses"]
    for key in ("losses", "grad_norms"):
        assert len(dp2[0][key]) == len(dp1_ga2[key]) == 3
        torch.testing.assert_close(torch.tensor(dp2[0][key]), torch.tensor(dp1_ga2[key]), **TOL)
    assert dp2[0]["weights"].keys() == dp1_ga2["weights"].keys()
    for name, value in dp1_ga2["weights"].items():
        torch.testing.assert_close(dp2[0]["weights"][name], value, **TOL, msg=name)
