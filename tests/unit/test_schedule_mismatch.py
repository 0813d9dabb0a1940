"""The LR-schedule check of a resume names each setting megatron's scheduler compares as the flag the user typed,
says nothing when the schedules agree or a flag chose one, and the checkpoint loaders raise it as one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mindspeed_mm_osp.checkpoint.checkpointing import ScheduleMismatchError, check_schedule
from mindspeed_mm_osp.checkpoint.reader import RankFile
from mindspeed_mm_osp.errors import UserError
from mindspeed_mm_osp.optim import OptimizerSettings, build_lr_scheduler, schedule_mismatches

BASE = OptimizerSettings(lr=1e-4, min_lr=1e-6, weight_decay=0.01, train_iters=150, lr_decay_style="linear")


def _scheduler(settings: OptimizerSettings):
    return build_lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr), settings)


def _saved(**changes) -> dict:
    """The scheduler state a run with `BASE` changed by `changes` saved after 10 steps."""
    scheduler = _scheduler(dataclasses.replace(BASE, **changes))
    scheduler.step(10)
    return scheduler.state_dict()


# what the checkpoint's run had -> what the message must say (this run is BASE)
CASES = {
    "train_iters": (dict(train_iters=400), ["--train-iters 150 (checkpoint: 400)"]),
    "lr": (dict(lr=2e-4), ["--lr 0.0001 (checkpoint: 0.0002)"]),
    "min_lr": (dict(min_lr=0.0), ["--min-lr 1e-06 (checkpoint: 0.0)"]),
    "warmup": (dict(lr_warmup_iters=5), ["--lr-warmup-iters 0 (checkpoint: 5)"]),
    "decay style": (dict(lr_decay_style="cosine"), ["--lr-decay-style linear (checkpoint: cosine)"]),
    "decay iters": (dict(lr_decay_iters=100), ["--train-iters 150 (checkpoint: 100)"]),
    "weight decay": (dict(weight_decay=0.1), ["--weight-decay 0.01 (checkpoint: 0.1)"]),
    "two flags": (dict(lr=2e-4, train_iters=400), ["--lr 0.0001 (checkpoint: 0.0002)",
                                                    "--train-iters 150 (checkpoint: 400)"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_differing_setting_is_named_as_its_flag(name):
    changes, expected = CASES[name]
    assert schedule_mismatches(_scheduler(BASE), _saved(**changes)) == expected


def test_derived_step_counts_name_the_flag_that_set_them():
    epochs = dataclasses.replace(BASE, train_epochs=2, train_iters=300)
    assert schedule_mismatches(_scheduler(epochs), _saved()) == [
        "--train-iters / --train-epochs 2 gives 300 (checkpoint: 150)"]
    fraction = dataclasses.replace(BASE, lr_warmup_fraction=0.1)
    assert schedule_mismatches(_scheduler(fraction), _saved()) == [
        "--lr-warmup-fraction 0.1 gives 15 (checkpoint: 0)"]
    decay = dataclasses.replace(BASE, lr_decay_iters=200)
    assert schedule_mismatches(_scheduler(decay), _saved()) == ["--lr-decay-iters 200 (checkpoint: 150)"]


@pytest.mark.parametrize("flag", ["override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler"])
def test_either_megatron_flag_accepts_the_difference(flag):
    chosen = dataclasses.replace(BASE, **{flag: True})
    assert schedule_mismatches(_scheduler(chosen), _saved(train_iters=400)) == []
    assert schedule_mismatches(_scheduler(BASE), _saved()) == []


def test_both_megatron_flags_are_refused():
    with pytest.raises(ValueError, match="mutually exclusive"):
        dataclasses.replace(BASE, override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True)


def test_check_names_the_iteration_folder_on_one_line(tmp_path):
    file = tmp_path / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    with pytest.raises(ScheduleMismatchError) as e:
        check_schedule(_scheduler(BASE), RankFile(file, {"opt_param_scheduler": _saved(train_iters=400)}))
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message
    assert message.startswith(f"{tmp_path / 'iter_0000010'}: ") and "--train-iters 150 (checkpoint: 400)" in message
    check_schedule(_scheduler(BASE), RankFile(file, {"opt_param_scheduler": _saved()}))  # unchanged: passes
