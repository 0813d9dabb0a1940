"""Planner CLI: the YES/NO answer, the cheapest fitting change and its flags pasted back into pretrain.py (the
figures themselves: tests/distributed/test_memory_plan.py)."""

import json
import shlex

import pytest
import torch

from helpers import launcher_argv
from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.predictor import PredictorConfig, RecomputeConfig
from mindspeed_mm_osp.tools import plan as plan_cli
from mindspeed_mm_osp.training.args import RecomputeArgs
from mindspeed_mm_osp.training.arguments import parse_args
from mindspeed_mm_osp.training.memory_plan import (GIB, EncoderPlan, OptimizerPlan, Parallel, Workload, fits,
                                                   headroom, plan_memory)

CFG = from_dict(PredictorConfig, dict(num_layers=[2, 2, 2], sparse_n=[1, 2, 1], num_heads=4, head_dim=64,
                                      in_channels=4, timestep_embed_dim=32, caption_channels=24,
                                      pooled_projection_dim=16))
WORK = Workload(1, 5, 32, 32, 16)
WORLD = 16  # the release launcher's flags as `launcher_argv` records them: 2 nodes x 8 devices


@pytest.fixture
def configs(tmp_path):
    """The tiny example with cached features (no encoder folders needed)."""
    model = json.loads(plan_cli.Path("examples/tiny/model.json").read_text())
    model.update(load_video_features=True, load_text_features=True)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    return ["--mm-model", str(path), "--mm-data", "examples/tiny/data.json"]


@pytest.fixture(scope="module")
def release_argv(tmp_path_factory):
    """The release launcher's own pretrain.py flags (121x576x1024, TP 8 + SP, selective FFN x 32)."""
    return launcher_argv(tmp_path_factory.mktemp("launcher"))


def _request(argv):
    args = plan_cli.build_parser().parse_args(argv)
    args.argv = argv
    return args, plan_cli.request_from_args(args)


def _plan(req):
    return plan_memory(req.predictor, req.work, req.par, req.recompute, req.act_dtype, req.opt, req.encoders)


def _pasted(output: str) -> list[str]:
    """The flags of the printed suggestion, as a shell would split the pasted line."""
    line = next(row for row in output.splitlines() if row.startswith("  flags:"))
    return shlex.split(line.split(":", 1)[1])


def _replans_to(flags, cand):
    """The pasted flags parse as pretrain.py flags and plan to exactly the suggested setting."""
    args = parse_args(flags, world_size=WORLD)
    assert args.tensor_model_parallel_size == cand.tp and args.use_distributed_optimizer == cand.distributed
    assert RecomputeArgs.from_namespace(args).recompute_config() == cand.recompute
    assert _plan(_request(flags + ["--world-size", str(WORLD)])[1]).total == cand.plan.total


@pytest.mark.parametrize("gib, smallest_tp", [(64, 2), (80, 2), (141, 1)])
def test_release_launcher_fits_and_its_smallest_tp_pastes_back(release_argv, gib, smallest_tp):
    argv = release_argv + ["--world-size", str(WORLD), "--device-memory-gib", str(gib)]
    args, req = _request(argv)
    out = plan_cli.run(args)
    plan = _plan(req)
    assert out.splitlines()[0] == (f"fits {gib} GiB per device: YES (peak {plan.total / GIB:.1f} GiB + headroom "
                                   f"{headroom(plan) / GIB:.1f} GiB = {(plan.total + headroom(plan)) / GIB:.1f} "
                                   f"GiB of {gib})")
    cand = plan_cli.suggest(req, gib)
    assert cand.tp == smallest_tp and fits(cand.plan, gib * GIB)
    assert f"smallest TP that also fits: TP {smallest_tp}" in out
    _replans_to(_pasted(out), cand)


@pytest.mark.parametrize("gib", [64, 80, 141])
def test_release_at_tp1_without_distributed_optimizer_is_a_no_with_a_pasteable_fix(release_argv, gib):
    argv = [t for t in release_argv if t != "--use-distributed-optimizer"]
    argv += ["--tensor-model-parallel-size", "1", "--world-size", str(WORLD), "--device-memory-gib", str(gib)]
    args, req = _request(argv)
    out = plan_cli.run(args)
    assert out.startswith(f"fits {gib} GiB per device: NO")
    cand = plan_cli.suggest(req, gib)
    # The optimizer state of TP 1 (16 bytes per parameter, unsharded) alone exceeds every budget here: the fix
    # must turn the distributed optimizer on.
    assert cand.distributed and "--use-distributed-optimizer" in out.splitlines()[2]
    assert fits(cand.plan, gib * GIB) and not fits(_plan(req), gib * GIB)
    _replans_to(_pasted(out), cand)


def test_a_setting_short_of_its_headroom_is_not_a_fit():
    plan = plan_memory(CFG, WORK, Parallel(), RecomputeConfig(), torch.bfloat16)
    assert fits(plan, plan.total + headroom(plan)) and not fits(plan, plan.total + headroom(plan) - 1)
    assert headroom(plan) > GIB + plan.workspace


def test_cli_prints_every_component_and_a_fitting_suggestion(configs, capsys):
    plan_cli.main(configs + ["--world-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                             "--selective_recom", "--recom_ffn_layers", "14", "--device-memory-gib", "2"])
    out = capsys.readouterr().out
    for row in ("weights", "main grads", "optimizer state", "activations", "frozen encoders", "workspace",
                "total", "FLOPs"):
        assert row in out
    assert out.startswith("fits 2 GiB per device: YES")
    assert "TP=2 SP=True" in out and "selective FFN, first 14 blocks" in out
    assert "smallest TP that also fits: TP 1, recompute none, plain optimizer" in out
    assert "  append:  --tensor-model-parallel-size 1\n  remove:  --selective_recom --recom_ffn_layers\n" in out


def test_cli_rejects_a_tp_that_does_not_divide_heads(configs, capsys):
    with pytest.raises(SystemExit):
        plan_cli.main(configs + ["--world-size", "3", "--tensor-model-parallel-size", "3"])
    assert "num_heads" in capsys.readouterr().err


def _tiny_request(distributed=False):
    return plan_cli.PlanRequest(predictor=CFG, work=WORK, par=Parallel(tp=1, dp=2), recompute=RecomputeConfig(),
                                act_dtype=torch.bfloat16, opt=OptimizerPlan(distributed=distributed),
                                encoders=EncoderPlan(), world=2, microbatches=1)


def test_suggestion_is_the_cheapest_fit():
    par, opt = Parallel(tp=1, dp=2), OptimizerPlan()
    none = plan_memory(CFG, WORK, par, RecomputeConfig(), torch.bfloat16, opt)
    full = plan_memory(CFG, WORK, par, RecomputeConfig(granularity="full", num_layers=6), torch.bfloat16, opt)
    budget = (none.total + headroom(none) + full.total + headroom(full)) / 2 / GIB
    best = plan_cli.suggest(_tiny_request(), budget)
    assert best is not None and best.tp == 1 and fits(best.plan, budget * GIB)
    cheaper = plan_cli.recompute_options(6)
    for option in cheaper[:cheaper.index(best.recompute)]:
        for distributed in (False, True):
            plan = plan_memory(CFG, WORK, par, option, torch.bfloat16, OptimizerPlan(distributed=distributed))
            assert not fits(plan, budget * GIB)
    assert plan_cli.suggest(_tiny_request(), 1e-6) is None


def test_training_command_replaces_every_spelling_and_drops_the_planner_flags():
    argv = ["--mm-data", "d.json", "--tensor-model-parallel-size=8", "--selective-recom", "--recom-ffn-layers", "3",
            "--plan", "--world-size", "8", "--json", "--lr", "1e-4"]
    cmd = plan_cli.training_command(argv, ["--tensor-model-parallel-size", "2"], ["--selective_recom",
                                                                                  "--recom_ffn_layers"])
    assert cmd == ["--mm-data", "d.json", "--lr", "1e-4", "--tensor-model-parallel-size", "2"]


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
    cli.main(configs + ["--plan", "--train-iters", "1", "--world-size", "1", "--json", "--device-memory-gib", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False  # the 1 GiB runtime allowance of the headroom alone fills the device
    assert report["total"] == sum(report["plan"][k] for k in ("weights", "grads", "optimizer", "activations",
                                                               "encoders", "workspace"))
    assert report["headroom"] > report["plan"]["workspace"]
