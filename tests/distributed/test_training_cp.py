"""Training with Ulysses context parallelism on the real tiny models and videos.

One set of runs (CP=2 with the distributed optimizer) checks: the CP=2 loss and gradient-norm curves equal CP=1 (1e-4; the norms catch a wrong
gradient scale, to which Adam's update, hence the loss curve, is almost blind); a CP=2 resume (3 + 3) is bit-exact with the
straight CP=2 run; a CP=2 checkpoint resumes at CP=1 and a CP=1 checkpoint at CP=2 on the CP=1 curve; the
checkpoint layout does not depend on CP (same files and keys; the unchanged converter merges a CP=2 checkpoint
into the CP=1 one's weights).
"""

import pytest
import torch
from safetensors.torch import load_file

from mindspeed_mm_osp.checkpoint import convert
from mindspeed_mm_osp.testing import run_distributed
from helpers import final_weights, train_and_record, training_argv

pytestmark = pytest.mark.slow

TOL = dict(rtol=1e-4, atol=1e-5)


def _run(assets, cp, *extra, iters=6):
    """CP > 1 runs use the distributed optimizer, sharded over the DP x CP group."""
    optimizer = ["--use-distributed-optimizer"] if cp > 1 else []
    argv = training_argv(assets, "--context-parallel-size", str(cp), "--context-parallel-algo", "ulysses_cp_algo",
                         *optimizer, *extra, iters=iters)
    ranks = run_distributed(train_and_record, cp, argv, cp=cp, timeout=300)
    assert all(r == ranks[0] for r in ranks)  # CP peers report the same loss and norm
    return ranks[0]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_cp2_training_matches_cp1_resumes_and_converts(tiny_assets, tmp_path):
    cp1_dir, cp2_dir = tmp_path / "cp1", tmp_path / "cp2"
    cp1 = _run(tiny_assets, 1, "--save", str(cp1_dir), "--save-interval", "3")
    cp2 = _run(tiny_assets, 2, "--save", str(cp2_dir), "--save-interval", "3")
    assert len(cp1["losses"]) == len(cp2["losses"]) == 6
    for key in ("losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(cp2[key]), torch.tensor(cp1[key]), **TOL)

    # CP=2 resume from iteration 3: bit-exact with the straight CP=2 run
    resumed = _run(tiny_assets, 2, "--load", str(cp2_dir), "--ckpt-step", "3", "--save", str(tmp_path / "r22"))
    assert resumed["losses"] == cp2["losses"][3:]
    _, model_a, ema_a = final_weights(cp2_dir)
    _, model_b, ema_b = final_weights(tmp_path / "r22")
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)

    # across CP sizes: CP=2 -> CP=1 and CP=1 -> CP=2 continue on the CP=1 curve
    for cp, source in ((1, cp2_dir), (2, cp1_dir)):
        cross = _run(tiny_assets, cp, "--load", str(source), "--ckpt-step", "3", "--save", str(tmp_path / f"x{cp}"))
        torch.testing.assert_close(torch.tensor(cross["losses"]), torch.tensor(cp1["losses"][3:]), **TOL)

    # same layout; the converter (unchanged) gives the CP=1 weights from the CP=2 checkpoint
    assert _files(cp1_dir) == _files(cp2_dir)
    for name, root in (("cp1", cp1_dir), ("cp2", cp2_dir)):
        convert.main(["--load_dir", str(root), "--save_dir", str(tmp_path / f"merged_{name}"), "--ema",
                      "--format", "safetensors"])
    (merged_1,), (merged_2,) = ((tmp_path / f"merged_{n}").glob("*.safetensors") for n in ("cp1", "cp2"))
    a, b = load_file(str(merged_1)), load_file(str(merged_2))
    assert list(a) == list(b) and merged_1.name == merged_2.name
    for key in a:
        torch.testing.assert_close(b[key], a[key], **TOL)
