"""pretrain.py flags: the reference launcher's full flag set parses; bad combinations fail clearly."""

import pytest

from mindspeed_mm_osp.training.arguments import NO_OP_FLAGS, build_parser, parse_args
from helpers import launcher_argv

BASE = ["--mm-data", "d.json", "--mm-model", "m.json", "--train-iters", "10"]


def test_reference_launcher_flags_parse(tmp_path):
    argv = launcher_argv(tmp_path)
    args = parse_args(argv, world_size=16)
    assert args.tensor_model_parallel_size == 8 and args.data_parallel_size == 2
    assert args.global_batch_size == 2 and args.num_microbatches == 1
    assert args.sequence_parallel and args.use_distributed_optimizer and args.bf16
    assert args.optimizer_selection == "fused_ema_adamw" and args.clip_grad_ema_decay == 0.99
    assert args.selective_recom and args.recom_ffn_layers == 32
    assert args.adam_eps == 1e-15 and args.weight_decay == 1e-4 and args.lr == 1e-5
    every_noop = {f for f in NO_OP_FLAGS if f in argv}
    assert {"--swiglu", "--num-layers", "--use-ema", "--qk-layernorm"} <= every_noop


def test_unknown_flag_is_named(capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--tensor-model-paralel-size", "2"])
    assert "unknown flag(s): --tensor-model-paralel-size" in capsys.readouterr().err


def test_no_abbreviations():
    with pytest.raises(SystemExit):
        build_parser().parse_args(BASE + ["--tensor-model", "2"])


@pytest.mark.parametrize("extra, world, message", [
    (["--selective_recom", "--recom_ffn_layers", "4", "--recompute-granularity", "full", "--recompute-num-layers",
      "2"], 1, "mutually exclusive"),
    (["--recom_ffn_layers", "4"], 1, "needs --selective_recom"),
    (["--tensor-model-parallel-size", "3"], 4, "must divide the world size 4"),
    (["--global-batch-size", "3"], 2, "multiple of --micro-batch-size"),
    (["--bf16", "--fp16"], 1, "mutually exclusive"),
    (["--save-interval", "0", "--save", "x"], 1, "must be > 0"),
    (["--save-interval", "5"], 1, "needs --save"),
    (["--clip_grad_ema_decay", "1.5"], 1, "must be in (0, 1)"),
    (["--tensor-model-parallel-size", "2", "--context-parallel-size", "2"], 6,
     "--tensor-model-parallel-size=2 x --context-parallel-size=2 must divide the world size 6"),
    (["--context-parallel-size", "0"], 1, "--context-parallel-size must be >= 1"),
    (["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"], 2,
     "--context-parallel-algo megatron_cp_algo is not implemented; use ulysses_cp_algo"),
])
def test_invalid_combinations(capsys, extra, world, message):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra, world_size=world)
    assert message in capsys.readouterr().err


def test_sequence_parallel_needs_tp():
    assert parse_args(BASE + ["--sequence-parallel"], world_size=2).sequence_parallel is False
    assert parse_args(BASE + ["--sequence-parallel", "--tensor-model-parallel-size", "2"],
                      world_size=2).sequence_parallel is True


def test_data_parallel_size_excludes_context_parallel():
    args = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2",
                              "--micro-batch-size", "2"], world_size=8)
    assert args.data_parallel_size == 2 and args.global_batch_size == 4 and args.num_microbatches == 1
    assert args.context_parallel_algo == "ulysses_cp_algo"
