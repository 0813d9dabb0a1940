"""`pretrain.py --distill trajectory` through the real trainer on the tiny models, TP=2 + SP: only the adapters
change (the base stays bit-identical), 3 + 3 resumed iterations equal 6 bit for bit, CP=2 and TP=2 + SP train as
one rank does, the merged student samples as the unmerged one, on its own schedule with CFG off, and its sampler
at TP=2 equals TP=1."""

import json

import pytest
import torch

from mindspeed_mm_osp.testing import perturb_parameters, run_distributed
from helpers import infer_on_rank, tiny_assets_inference

pytestmark = pytest.mark.slow

STUDENT = {"student_steps": 2, "teacher_substeps": 2, "shift": 3.0, "guidance_scale": 4.0, "guidance_rescale": 0.7,
           "method": "trajectory"}
TP2_SP = ("--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer")


@pytest.fixture(scope="module")
def teacher(tiny_assets, tmp_path_factory):
    """Base weights of the tiny predictor (a merged TP=1 file), perturbed so that every layer matters."""
    from mindspeed_mm_osp.config import load_model_config
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT, local_state_dict

    torch.manual_seed(7)
    model = SparseUMMDiT(load_model_config(tiny_assets["model_json"]).predictor)
    perturb_parameters(model, torch.Generator().manual_seed(8))
    path = tmp_path_factory.mktemp("distill_teacher") / "teacher.pt"
    torch.save(local_state_dict(model), path)
    return path


def _argv(assets, base, *extra, iters, layout=TP2_SP):
    return ["--mm-data", str(assets["data_json"]), "--mm-model", str(assets["model_json"]), "--micro-batch-size", "1",
            "--train-iters", str(iters), "--lr", "1e-3", "--clip-grad", "1.0", "--seed", "1234", "--ema-decay", "0.9",
            "--load", str(base), "--lora-r", "4", "--lora-alpha", "8", "--distill", "trajectory",
            "--distill-student-steps", "2", "--distill-teacher-substeps", "2", "--distill-shift", "3",
            "--distill-guidance-scale", "4", "--distill-guidance-rescale", "0.7", "--distill-text-length", "16", *layout,
            *extra]


def _train(rank, world_size, argv, base_path):
    from mindspeed_mm_osp.models.predictor import shard_state_dict
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.distill import DistillTrainer

    trainer = DistillTrainer(parse_args(argv, world_size=world_size))
    result = trainer.fit()
    model, ctx = trainer.ddp.module, trainer.ddp.module.ctx
    base = shard_state_dict(torch.load(base_path, weights_only=True), ctx.tp_rank, ctx.tp_size)
    frozen = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not p.requires_grad}
    adapters_b = [p for n, p in model.named_parameters() if n.endswith(".lora_B")]
    return {"losses": result.losses, "iteration": result.iteration,
            "base_identical": frozen.keys() == base.keys() and all(torch.equal(p.cpu(), base[n])
                                                                  for n, p in frozen.items()),
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "trained_b": sum(int(p.abs().sum() > 0) for p in adapters_b), "num_b": len(adapters_b)}


def _payload(save_dir, rank=0):
    from mindspeed_mm_osp.checkpoint.layout import model_file, read_tracker

    return torch.load(model_file(save_dir, read_tracker(save_dir), rank), map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def straight(tiny_assets, teacher, tmp_path_factory):
    """Six uninterrupted iterations at TP=2 + SP: (per-rank results, checkpoint folder)."""
    save = tmp_path_factory.mktemp("distill_straight")
    return run_distributed(_train, 2, _argv(tiny_assets, teacher, "--save", str(save), iters=6), teacher, tp=2,
                           timeout=400), save


def test_only_adapters_train_and_resume_is_bit_exact(tiny_assets, teacher, straight, tmp_path):
    full, straight_dir = straight
    split = tmp_path / "split"
    first = run_distributed(_train, 2, _argv(tiny_assets, teacher, "--save", str(split), "--save-interval", "3",
                                             "--exit-interval", "3", iters=6), teacher, tp=2, timeout=400)
    second = run_distributed(_train, 2, _argv(tiny_assets, teacher, "--save", str(split), "--lora-load", str(split),
                                              iters=6), teacher, tp=2, timeout=400)
    assert first[0]["iteration"] == 3 and second[0]["iteration"] == 6
    assert first[0]["losses"] + second[0]["losses"] == full[0]["losses"]
    assert all(r["base_identical"] for r in full + second)
    assert all(n.endswith((".lora_A", ".lora_B")) for n in full[0]["trainable"])
    assert full[0]["trained_b"] == full[0]["num_b"] > 0
    for rank in range(2):
        a, b = _payload(straight_dir, rank), _payload(split, rank)
        assert a["lora"]["distill"] == STUDENT
        for key in ("model", "ema_model"):
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_merged_student_samples_as_unmerged_on_its_schedule_at_tp1_and_tp2(tiny_assets, teacher, straight, tmp_path):
    from mindspeed_mm_osp.checkpoint import convert
    from mindspeed_mm_osp.inference import cli
    from mindspeed_mm_osp.inference.pipeline import load_latents

    _, ckpt = straight
    merged = tmp_path / "merged"
    convert.main(["--lora-merge", "--load_dir", str(ckpt), "--base", str(teacher), "--save_dir", str(merged),
                  "--format", "safetensors"])
    assert json.loads((merged / "convert_info.json").read_text())["student"] == STUDENT
    config = tiny_assets_inference(tiny_assets, tmp_path, steps=50)  # the JSON's 50 steps and CFG give way
    weights = str(merged / "model.safetensors")
    runs = {"unmerged": ["--predictor-weights", str(teacher), "--lora", str(ckpt)],
            "merged": ["--predictor-weights", weights], "teacher": ["--predictor-weights", str(teacher)]}
    for name, flags in runs.items():
        cli.main(["--config", str(config), "--save-latents", "--save-path", str(tmp_path / name), *flags])
    run_distributed(infer_on_rank, 2, ["--config", str(config), "--save-latents", "--save-path", str(tmp_path / "tp2"),
                                       "--predictor-weights", weights, "--tensor-model-parallel-size", "2"],
                    tp=2, timeout=300)
    got = {name: load_latents(tmp_path / name / "000000.safetensors") for name in (*runs, "tp2")}
    for name in ("merged", "unmerged", "tp2"):
        record = got[name].record
        assert (record["num_inference_steps"], record["guidance_scale"], record["shift"]) == (2, 1.0, 3.0), name
        assert record["student"] == STUDENT
    assert got["teacher"].record["student"] is None and got["teacher"].record["num_inference_steps"] == 50
    torch.testing.assert_close(got["merged"].latents, got["unmerged"].latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["tp2"].latents, got["merged"].latents, rtol=1e-5, atol=1e-5)


def test_context_parallel_distillation_equals_one_rank(tiny_assets, teacher, straight):
    """CP=2 (Ulysses) and TP=2 + SP train the same student as one rank: losses of 3 iterations within 1e-5."""
    one = run_distributed(_train, 1, _argv(tiny_assets, teacher, iters=3, layout=()), teacher, timeout=400)
    cp2 = run_distributed(_train, 2, _argv(tiny_assets, teacher, iters=3, layout=("--context-parallel-size", "2")),
                          teacher, cp=2, timeout=400)
    for other in (cp2[0]["losses"], straight[0][0]["losses"][:3]):
        torch.testing.assert_close(torch.tensor(other), torch.tensor(one[0]["losses"]), rtol=1e-5, atol=1e-6)
