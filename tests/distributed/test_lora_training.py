"""LoRA fine-tuning through the real trainer on the tiny models: only the adapters change (base bit-identical,
checkpoints hold adapters only), and an interrupted TP=2+SP run resumed with --lora-load equals the straight run
bit for bit."""

import pytest
import torch

from mindspeed_mm_osp.testing import run_distributed
from helpers import tiny_assets_inference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_base(tiny_assets, tmp_path_factory):
    """Base weights for the tiny predictor (a merged TP=1 file, as the demo's merged EMA)."""
    from mindspeed_mm_osp.config import load_model_config
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT, local_state_dict

    torch.manual_seed(7)
    model = SparseUMMDiT(load_model_config(tiny_assets["model_json"]).predictor)
    path = tmp_path_factory.mktemp("lora_base") / "base.pt"
    torch.save(local_state_dict(model), path)
    return path


def _argv(assets, base, *extra, iters):
    return ["--mm-data", str(assets["data_json"]), "--mm-model", str(assets["model_json"]), "--micro-batch-size", "1",
            "--train-iters", str(iters), "--lr", "1e-3", "--clip-grad", "1.0", "--seed", "1234", "--log-interval", "1",
            "--load", str(base), "--lora-r", "4", "--lora-alpha", "8", *extra]


def _train(rank, world_size, argv, base_path):
    from mindspeed_mm_osp.models.predictor import shard_state_dict
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.trainer import Trainer

    trainer = Trainer(parse_args(argv, world_size=world_size))
    result = trainer.fit()
    model = trainer.ddp.module
    ctx = model.ctx
    base = shard_state_dict(torch.load(base_path, weights_only=True), ctx.tp_rank, ctx.tp_size)
    frozen = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not p.requires_grad}
    base_identical = frozen.keys() == base.keys() and all(torch.equal(p.cpu(), base[n]) for n, p in frozen.items())
    adapters_b = [p for n, p in model.named_parameters() if n.endswith(".lora_B")]
    return {"losses": result.losses, "iteration": result.iteration, "base_identical": base_identical,
            "trained_b": sum(int(p.abs().sum() > 0) for p in adapters_b), "num_b": len(adapters_b)}


def _payload(save_dir, rank=0):
    from mindspeed_mm_osp.checkpoint.layout import model_file, read_tracker

    return torch.load(model_file(save_dir, read_tracker(save_dir), rank), map_location="cpu", weights_only=False)


def test_only_adapters_train(tiny_assets, lora_base, tmp_path):
    out = run_distributed(_train, 1, _argv(tiny_assets, lora_base, "--save", str(tmp_path), iters=10), lora_base,
                          timeout=240)[0]
    assert out["iteration"] == 10 and out["base_identical"]
    assert out["trained_b"] == out["num_b"] > 0  # every B left zero, so every adapter trained
    payload = _payload(tmp_path)
    assert payload["lora"]["config"]["r"] == 4
    assert set(payload["model"]) == set(payload["ema_model"]) == set(payload["optimizer"]["state"])
    assert all(k.endswith((".lora_A", ".lora_B")) for k in payload["model"])


def test_resume_with_lora_load_equals_uninterrupted(tiny_assets, lora_base, tmp_path):
    extra = ("--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer")
    straight, split = tmp_path / "straight", tmp_path / "split"
    full = run_distributed(_train, 2, _argv(tiny_assets, lora_base, *extra, "--save", str(straight), iters=6),
                           lora_base, tp=2, timeout=240)
    first = run_distributed(_train, 2, _argv(tiny_assets, lora_base, *extra, "--save", str(split), "--save-interval",
                                             "3", "--exit-interval", "3", iters=6), lora_base, tp=2, timeout=240)
    second = run_distributed(_train, 2, _argv(tiny_assets, lora_base, *extra, "--save", str(split), "--lora-load",
                                              str(split), iters=6), lora_base, tp=2, timeout=240)
    assert first[0]["iteration"] == 3 and second[0]["iteration"] == 6
    assert first[0]["losses"] + second[0]["losses"] == full[0]["losses"]
    assert all(r["base_identical"] for r in full + second)
    for rank in range(2):
        a, b = _payload(straight, rank), _payload(split, rank)
        for key in ("model", "ema_model"):
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        for name, entry in a["optimizer"]["state"].items():
            for k, v in entry.items():
                other = b["optimizer"]["state"][name][k]
                assert torch.equal(v, other) if torch.is_tensor(v) else v == other, (name, k)


def test_inference_with_adapters_equals_merged_weights(tiny_assets, lora_base, tmp_path):
    """`inference.py --lora` (unmerged) and `convert_mm_to_ckpt.py --lora-merge` weights give the same latents;
    `--lora-scale 0` gives the base's."""
    from mindspeed_mm_osp.checkpoint import convert
    from mindspeed_mm_osp.inference import cli
    from mindspeed_mm_osp.inference.pipeline import load_latents

    ckpt = tmp_path / "ckpt"
    run_distributed(_train, 1, _argv(tiny_assets, lora_base, "--save", str(ckpt), iters=4), lora_base, timeout=240)
    convert.main(["--lora-merge", "--load_dir", str(ckpt), "--base", str(lora_base), "--save_dir",
                  str(tmp_path / "merged"), "--format", "safetensors"])
    config = tiny_assets_inference(tiny_assets, tmp_path)
    runs = {"lora": ["--predictor-weights", str(lora_base), "--lora", str(ckpt)],
            "merged": ["--predictor-weights", str(tmp_path / "merged" / "model.safetensors")],
            "scale0": ["--predictor-weights", str(lora_base), "--lora", str(ckpt), "--lora-scale", "0"],
            "base": ["--predictor-weights", str(lora_base)]}
    latents = {}
    for name, flags in runs.items():
        cli.main(["--config", str(config), "--save-latents", "--save-path", str(tmp_path / name), *flags])
        latents[name] = load_latents(tmp_path / name / "000000.safetensors")
    assert latents["lora"].record["lora"] == str(ckpt)
    torch.testing.assert_close(latents["merged"].latents, latents["lora"].latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latents["scale0"].latents, latents["base"].latents, rtol=0, atol=0)
    assert not torch.allclose(latents["lora"].latents, latents["base"].latents, rtol=1e-4, atol=1e-4)
