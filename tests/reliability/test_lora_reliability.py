"""The reliability guarantees hold for LoRA runs (adapter-only checkpoints): NaN/Inf gradients are skipped with
adapters, EMA, moments and LR untouched; a SIGKILL during an adapter-checkpoint save leaves the tracker on a
complete checkpoint, and resuming it with --lora-load reproduces the uninterrupted run bit for bit."""

from __future__ import annotations

import signal

import pytest
import torch

from mindspeed_mm_osp.checkpoint.layout import model_file
from reliability_harness import (SAVE_ITERS, assert_same_training_state, assert_step_skipped, check_survived,
                                 load_file, log, run_ranks, start_ranks, train, train_and_kill_self, train_argv)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_flags(micro_assets, tmp_path_factory):
    """Base weights of the micro predictor and the LoRA flags that fine-tune them."""
    from mindspeed_mm_osp.config import load_model_config
    from mindspeed_mm_osp.models.predictor import SparseUMMDiT, local_state_dict

    torch.manual_seed(3)
    base = tmp_path_factory.mktemp("lora_base") / "base.pt"
    torch.save(local_state_dict(SparseUMMDiT(load_model_config(micro_assets["model_json"]).predictor)), base)
    return ("--load", str(base), "--lora-r", "4", "--lora-alpha", "8")


def test_lora_nonfinite_gradients_are_skipped(micro_assets, lora_flags, tmp_path):
    save_dir = tmp_path / "ckpt"
    argv = train_argv(micro_assets, "--save", str(save_dir), "--save-interval", "1", "--inject-nonfinite-grad",
                      "2:nan,4:inf", "--max-consecutive-skips", "2", *lora_flags, iters=5)
    ok, out = run_ranks(train, 1, argv)[0]
    assert ok, out
    assert out["iteration"] == 5 and out["skipped"] == 2
    for it in (2, 4):
        assert f"iteration {it} skipped:" in out["log"]
        assert_step_skipped(save_dir, it)
    for it in (3, 5):
        before, after = load_file(model_file(save_dir, it - 1, 0)), load_file(model_file(save_dir, it, 0))
        assert any(not before["model"][k].equal(after["model"][k]) for k in before["model"])
    assert all(k.endswith((".lora_A", ".lora_B")) for k in after["model"])
    log("LoRA non-finite grads 2:nan,4:inf: both skipped with adapters, EMA, moments and LR untouched")


@pytest.fixture(scope="module")
def lora_reference(micro_assets, lora_flags, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_reference")
    ok, out = run_ranks(train, 1, train_argv(micro_assets, "--save", str(root), "--save-interval", "1", *lora_flags,
                                             iters=SAVE_ITERS))[0]
    assert ok, out
    return {"dir": root, "losses": out["losses"], "payload_size": model_file(root, SAVE_ITERS, 0).stat().st_size}


@pytest.mark.parametrize("point, fraction", [("payload_bytes", 0.5), ("payload_replace", 0.0),
                                             ("tracker_replaced", 0.0)])
def test_lora_sigkill_during_save_then_resume(micro_assets, lora_flags, lora_reference, tmp_path, point, fraction):
    save_dir = tmp_path / "ckpt"
    argv = train_argv(micro_assets, "--save", str(save_dir), "--save-interval", "1", *lora_flags, iters=SAVE_ITERS)
    ranks = start_ranks(train_and_kill_self, 1, argv, SAVE_ITERS, point, fraction, lora_reference["payload_size"])
    ranks.procs[0].join(240)
    assert ranks.procs[0].exitcode == -signal.SIGKILL
    tracked = check_survived(save_dir, lora_reference)
    assert tracked == (SAVE_ITERS if point == "tracker_replaced" else SAVE_ITERS - 1)
    ok, out = run_ranks(train, 1, [*argv, "--lora-load", str(save_dir)])[0]
    assert ok, out
    assert out["iteration"] == SAVE_ITERS and out["losses"] == lora_reference["losses"][tracked:]
    assert_same_training_state(load_file(model_file(save_dir, SAVE_ITERS, 0)),
                               load_file(model_file(lora_reference["dir"], SAVE_ITERS, 0)))
    log(f"LoRA kill-during-save at {point}: tracker={tracked}, resumed to the uninterrupted state")
