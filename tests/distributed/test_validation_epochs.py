"""Validation during training and epochs: the validation loss is the same in every parallel layout, validation (loss
and EMA samples) leaves training bit-identical, the mp4s are complete, and --train-epochs runs what it announces
with an exact resume in the middle of the second epoch."""

import json
import logging

import pytest
import torch

from mindspeed_mm_osp.testing import run_distributed
from helpers import final_weights, training_argv

pytestmark = pytest.mark.slow
VALIDATION_SIZE = (9, 32, 64)  # frames x height x width of the validation samples (2 latent frames, 4x8 latents)


@pytest.fixture(scope="module")
def sets(tiny_assets, tmp_path_factory):
    """A 6-video training set, a validation set of 2 videos and 1 image (two shapes), and a prompt file."""
    root = tmp_path_factory.mktemp("valid")
    set3 = tiny_assets["data"].root / "set3"
    records = json.loads((set3 / "anno.json").read_text())
    base = json.loads(tiny_assets["data_json"].read_text())

    def data_json(name: str, chosen: list) -> str:
        (root / f"{name}.anno.json").write_text(json.dumps(chosen))
        (root / f"{name}.txt").write_text(f"{set3},{root / f'{name}.anno.json'}\n")
        base["dataset_param"]["basic_parameters"]["data_path"] = str(root / f"{name}.txt")
        (root / f"{name}.json").write_text(json.dumps(base))
        return str(root / f"{name}.json")

    prompts = root / "prompts.txt"
    prompts.write_text("a white square moving over a grey background\n\na red fox in the snow\n")
    return {"train": data_json("train", records[:6]), "valid": data_json("valid", records[6:9]),
            "prompts": str(prompts), "assets": {**tiny_assets, "data_json": root / "train.json"}, "all": tiny_assets}


def _train(rank, world_size, argv):
    from mindspeed_mm_osp.training.arguments import parse_args
    from mindspeed_mm_osp.training.trainer import pretrain

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("mindspeed_mm_osp.train").addHandler(handler)
    result = pretrain(parse_args(argv, world_size=world_size))
    return {"losses": result.losses, "iteration": result.iteration, "validation": result.validation,
            "stop_reason": result.stop_reason, "log": lines}


def _valid_argv(sets, *extra):
    return ["--mm-valid-data", sets["valid"], "--eval-interval", "1", *extra]


def _layout_argv(sets):
    """The whole synthetic set (enough samples of a shape for a global batch of 2); learning rate 0, so that the
    weights validated are the initial ones in every layout (DP=2 draws other training noise than GA=2)."""
    return training_argv(sets["all"], "--global-batch-size", "2", "--lr", "0", *_valid_argv(sets), iters=1)


@pytest.fixture(scope="module")
def single_rank_validation(sets):
    return run_distributed(_train, 1, _layout_argv(sets), timeout=300)[0]


@pytest.mark.parametrize("tp, cp, extra", [
    (2, 1, ["--sequence-parallel"]),
    (1, 2, ["--use-distributed-optimizer"]),
    (1, 1, []),
], ids=["tp2-sp", "cp2", "dp2"])
def test_validation_loss_is_the_same_in_every_layout(sets, single_rank_validation, tp, cp, extra):
    """The validation loss after one step at TP=2+SP, CP=2 and DP=2 equals one process's (1e-5)."""
    reference = single_rank_validation
    argv = _layout_argv(sets) + ["--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(cp), *extra]
    ranks = run_distributed(_train, 2, argv, tp=tp, cp=cp, timeout=300)
    assert all(r["validation"] == ranks[0]["validation"] for r in ranks)
    assert set(reference["validation"]) == {1}
    torch.testing.assert_close(ranks[0]["validation"][1], reference["validation"][1], rtol=1e-5, atol=0)
    assert any(line.startswith("validation loss at iteration 1: ") and "over 3 samples" in line
               for line in reference["log"])


def test_validation_leaves_training_untouched_and_writes_the_videos(sets, tmp_path):
    """TP=2 + SP with the distributed optimizer: the validation loss and EMA samples every 2 steps change no loss,
    weight or EMA value; each round writes one mp4 per prompt with the asked frames and the data's fps."""
    from mindspeed_mm_osp.inference.video_io import read_mp4

    common = ["--sequence-parallel", "--use-distributed-optimizer", "--ema-decay", "0.5"]
    plain = run_distributed(_train, 2, training_argv(sets["assets"], "--save", str(tmp_path / "plain"), *common,
                                                     iters=4, tp=2), tp=2, timeout=300)
    frames, height, width = VALIDATION_SIZE
    validated = run_distributed(_train, 2, training_argv(
        sets["assets"], "--save", str(tmp_path / "valid"), *common,
        *_valid_argv(sets, "--eval-interval", "2", "--validation-prompts", sets["prompts"],
                     "--validation-interval", "2", "--validation-steps", "2",
                     "--validation-size", f"{frames}x{height}x{width}"), iters=4, tp=2), tp=2, timeout=300)
    assert validated[0]["losses"] == plain[0]["losses"] and len(plain[0]["losses"]) == 4
    assert sorted(validated[0]["validation"]) == [2, 4]
    _, model_a, ema_a = final_weights(tmp_path / "plain")
    _, model_b, ema_b = final_weights(tmp_path / "valid")
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    for it in (2, 4):
        folder = tmp_path / "valid" / "validation" / f"iter_{it:07d}"
        assert sorted(p.name for p in folder.glob("*.mp4")) == ["000000.mp4", "000001.mp4"]
        for path in folder.glob("*.mp4"):
            video, fps = read_mp4(path)
            assert video.shape == (frames, height, width, 3) and fps == 24.0
            assert json.loads(path.with_suffix(".json").read_text())["iteration"] == it
    assert any("validation samples at iteration 4: 2 prompt(s)" in line and "s of training time" in line
               for line in validated[0]["log"])


def test_three_epochs_run_18_iterations_and_resume_in_epoch_two_is_exact(sets, tmp_path):
    """6 samples, global batch 1, --train-epochs 3: 18 iterations announced and run; stopping at 8 (epoch 2) and
    resuming gives the same losses and weights; --train-iters beyond one pass warns and runs what the data allows."""
    epochs = ["--train-epochs", "3"]
    argv = [a for a in training_argv(sets["assets"]) if a not in ("--train-iters", "6")]
    straight = run_distributed(_train, 1, argv + epochs + ["--save", str(tmp_path / "a")], timeout=300)[0]
    assert straight["iteration"] == 18 and len(straight["losses"]) == 18
    assert straight["stop_reason"] == "train_iters reached"
    assert "training for 18 iterations (6 samples x 3 epoch(s) = 18 iterations at global batch 1)" in straight["log"]
    split = argv + epochs + ["--save", str(tmp_path / "b")]
    first = run_distributed(_train, 1, split + ["--save-interval", "8", "--exit-interval", "8"], timeout=300)[0]
    second = run_distributed(_train, 1, split + ["--load", str(tmp_path / "b")], timeout=300)[0]
    assert first["iteration"] == 8 and second["iteration"] == 18
    assert first["losses"] + second["losses"] == straight["losses"]
    _, model_a, ema_a = final_weights(tmp_path / "a")
    _, model_b, ema_b = final_weights(tmp_path / "b")
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]) and torch.equal(ema_a[key], ema_b[key]), key
    beyond = run_distributed(_train, 1, argv + ["--train-iters", "8"], timeout=300)[0]
    assert beyond["iteration"] == 6 and beyond["stop_reason"] == "train_iters reached"
    assert any(line.startswith("--train-iters 8 is more than the data allows") and "training for 6" in line
               and "--train-epochs 2" in line for line in beyond["log"])
