"""Planner CLI and fit suggestion (the figures themselves: tests/distributed/test_memory_plan.py)."""

import json

import pytest
import torch

from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig, RecomputeConfig
from mindspeed_mm_osp.tools import plan as plan_cli
from mindspeed_mm_osp.training.memory_plan import GIB, OptimizerPlan, Parallel, Workload, plan_memory

CFG = from_dict(PredictorConfig, dict(num_layers=[2, 2, 2], sparse_n=[1, 2, 1], num_heads=4, head_dim=64,
                                      in_channels=4, timestep_embed_dim=32, caption_channels=24,
                                      pooled_projection_dim=16))
WORK = Workload(1, 5, 32, 32, 16)


@pytest.fixture
def configs(tmp_path):
    """The tiny example with cached features (no encoder folders needed)."""
    model = json.loads(plan_cli.Path("examples/tiny/model.json").read_text())
    model.update(load_video_features=True, load_text_features=True)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    return ["--mm-model", str(path), "--mm-data", "examples/tiny/data.json"]


def test_cli_prints_every_component_and_a_fitting_suggestion(configs, capsys):
    plan_cli.main(configs + ["--world-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                             "--selective_recom", "--recom_ffn_layers", "14", "--device-memory-gib", "1"])
    out = capsys.readouterr().out
    for row in ("weights", "main grads", "optimizer state", "activations", "frozen encoders", "workspace",
                "total", "FLOPs"):
        assert row in out
    assert "TP=2 SP=True" in out and "--recom_ffn_layers 14" in out
    assert "fits 1 GiB: --tensor-model-parallel-size 1 recompute none" in out


def test_cli_rejects_a_tp_that_does_not_divide_heads(configs, capsys):
    with pytest.raises(SystemExit):
        plan_cli.main(configs + ["--world-size", "3", "--tensor-model-parallel-size", "3"])
    assert "num_heads" in capsys.readouterr().err


def test_suggestion_is_the_cheapest_fit():
    par = Parallel(tp=1, dp=2)
    none = plan_memory(CFG, WORK, par, RecomputeConfig(), torch.bfloat16, OptimizerPlan())
    full = plan_memory(CFG, WORK, par, RecomputeConfig(granularity="full", num_layers=6), torch.bfloat16)
    budget = (none.total + full.total) / 2 / GIB
    best = plan_cli.suggest(CFG, WORK, 2, 1, budget, torch.bfloat16, OptimizerPlan(), plan_cli.EncoderPlan())
    assert best is not None and best.tp == 1 and best.plan.total <= budget * GIB
    cheaper = plan_cli.recompute_options(6)
    for option in cheaper[:cheaper.index(best.recompute)]:
        assert plan_memory(CFG, WORK, par, option, torch.bfloat16).total > budget * GIB
    assert plan_cli.suggest(CFG, WORK, 2, 1, 1e-6, torch.bfloat16, OptimizerPlan(), plan_cli.EncoderPlan()) is None


def test_context_and_tensor_parallel_divide_the_sequence():
    base = plan_memory(CFG, WORK, Parallel(), RecomputeConfig(), torch.bfloat16)
    cp2 = plan_memory(CFG, WORK, Parallel(cp=2), RecomputeConfig(), torch.bfloat16)
    tp2 = plan_memory(CFG, WORK, Parallel(tp=2, sequence_parallel=True), RecomputeConfig(), torch.bfloat16)
    assert 0.45 < cp2.activations / base.activations < 0.6
    assert 0.45 < tp2.activations / base.activations < 0.6
    assert tp2.weights < 0.6 * base.weights and cp2.weights == base.weights
    dist = plan_memory(CFG, WORK, Parallel(dp=4), RecomputeConfig(), torch.bfloat16, OptimizerPlan(distributed=True))
    assert dist.optimizer * 4 == pytest.approx(base.optimizer, rel=1e-6)


def test_pretrain_plan_prints_the_plan_and_exits_before_training(configs, capsys, monkeypatch):
    from mindspeed_mm_osp.training import cli, trainer

    monkeypatch.setattr(trainer.Trainer, "__init__", lambda *a, **k: pytest.fail("training was started"))
    cli.main(configs + ["--plan", "--train-iters", "1", "--world-size", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == sum(report["plan"][k] for k in ("weights", "grads", "optimizer", "activations",
                                                               "encoders", "workspace"))
