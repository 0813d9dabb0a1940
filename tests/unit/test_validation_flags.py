"""Validation and epoch settings without training: flag errors (one line, exit 2), the validation size check, the
fixed noise levels, and the sampler's epochs (a new order each pass, resume at any position)."""

import contextlib
import io

import numpy as np
import pytest

from mindspeed_mm_osp.data.sampler import LengthGroupedSampler
from mindspeed_mm_osp.training.arguments import ArgumentError, parse_args
from mindspeed_mm_osp.training.validation import check_size, validation_sigmas

BASE = ["--mm-data", "d.json", "--mm-model", "m.json"]


@pytest.mark.parametrize("extra, message", [
    ([], "set --train-iters, --train-samples or --train-epochs"),
    (["--train-epochs", "0"], "--train-epochs"),
    (["--train-iters", "4", "--mm-valid-data", "v.json"], "--mm-valid-data needs --eval-interval N"),
    (["--train-iters", "4", "--eval-interval", "0"], "--eval-interval"),
    (["--train-iters", "4", "--mm-valid-data", "v.json", "--eval-interval", "2", "--eval-sigmas", "0"],
     "--eval-sigmas"),
    (["--train-iters", "4", "--validation-prompts", "p.txt", "--validation-interval", "2"],
     "--validation-prompts needs --save DIR"),
    (["--train-iters", "4", "--validation-interval", "2"], "--validation-interval needs --validation-prompts FILE"),
    (["--train-iters", "4", "--validation-size", "17x64"], "--validation-size '17x64': expected FRAMESxHEIGHTxWIDTH"),
])
def test_a_bad_validation_or_epoch_flag_exits_2_with_one_line(extra, message):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        parse_args(BASE + extra)
    assert exit_info.value.code == 2
    assert err.getvalue().count("\n") == 1 and message in err.getvalue(), err.getvalue()


def test_the_release_launchers_eval_flags_alone_are_accepted():
    args = parse_args(BASE + ["--train-iters", "4", "--eval-interval", "10", "--eval-iters", "10"])
    assert (args.eval_interval, args.eval_iters, args.mm_valid_data) == (10, 10, None)


def test_epochs_alone_leave_the_length_to_the_data():
    args = parse_args(BASE + ["--train-epochs", "3"])
    assert (args.train_iters, args.train_epochs) == (None, 3)
    assert parse_args(BASE + ["--train-iters", "5"]).train_epochs is None


def test_the_validation_size_must_fit_the_vae_and_the_patches(tiny_assets):
    from mindspeed_mm_osp.config import load_model_config

    cfg = load_model_config(tiny_assets["model_json"])  # temporal stride 8, spatial 8 x patch 2
    check_size((9, 32, 64), cfg)
    for size in [(8, 32, 64), (9, 24, 64), (9, 32, 40)]:
        with pytest.raises(ArgumentError, match=r"--validation-size .*: frames - 1 must be a multiple of 8"):
            check_size(size, cfg)


def test_validation_sigmas_are_evenly_spaced_midpoints():
    assert validation_sigmas(8).tolist() == [(2 * k + 1) / 16 for k in range(8)]


def test_the_sampler_reorders_each_epoch_and_resumes_anywhere():
    """6 samples of one shape, global batch 1, 3 epochs: every epoch a different permutation; a sampler resumed
    after any number of consumed samples yields the rest of the uninterrupted order."""
    shape_id = np.zeros(6, dtype=np.int64)

    def order(consumed):
        sampler = LengthGroupedSampler(shape_id, micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1,
                                       seed=1234, consumed_samples=consumed, num_epochs=3)
        return [(key.position, key.epoch) for batch in sampler for key in batch]

    full = order(0)
    assert len(full) == 18 and [e for _, e in full] == [0] * 6 + [1] * 6 + [2] * 6
    epochs = [tuple(p for p, _ in full[i:i + 6]) for i in (0, 6, 12)]
    assert all(sorted(e) == list(range(6)) for e in epochs) and len(set(epochs)) == 3
    for consumed in (1, 6, 8, 17):
        assert order(consumed) == full[consumed:]


@pytest.mark.parametrize("extra, message", [
    (["--mm-valid-data", "missing.json", "--eval-interval", "2"], "--mm-valid-data missing.json: does not exist"),
    (["--validation-prompts", "missing.txt", "--validation-interval", "2", "--save", "out"],
     "--validation-prompts missing.txt: does not exist"),
])
def test_a_missing_validation_file_is_named_before_anything_is_built(tiny_assets, tmp_path, monkeypatch, capsys,
                                                                      extra, message):
    from mindspeed_mm_osp.training.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["--mm-data", str(tiny_assets["data_json"]), "--mm-model", str(tiny_assets["model_json"]),
            "--train-iters", "2", *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
