"""LoRA on the predictor at TP=1: B=0 leaves the model unchanged, only adapters train, merge == unmerged,
target names are checked, the adapter checkpoint's base identity is checked."""

import dataclasses

import pytest
import torch

from mindspeed_mm_osp.config.lora import DEFAULT_TARGET_MODULES, LoRAConfig
from mindspeed_mm_osp.config.predictor import PredictorConfig
from mindspeed_mm_osp.models.lora import (
    apply_lora,
    check_base,
    load_lora_state_dict,
    lora_metadata,
    lora_state_dict,
    merge_lora,
)
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, local_state_dict, tp_split_dim
from mindspeed_mm_osp.testing import TINY_PREDICTOR, perturb_parameters, tiny_predictor_config

SMALL = dict(TINY_PREDICTOR, num_layers=[1, 2, 1])
TOL = dict(rtol=1e-5, atol=1e-5)


def small_config(**overrides) -> PredictorConfig:
    return tiny_predictor_config(SMALL, **overrides)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([3.0, 731.5]), torch.randn(2, 8, 24, generator=g),
            None, None, torch.randn(2, 16, generator=g))


def base_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = SparseUMMDiT(cfg).train()
    return perturb_parameters(model, torch.Generator().manual_seed(seed + 1))


def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, sd, "test")
    return sd


def test_zero_b_leaves_outputs_identical():
    cfg = small_config()
    model = base_model(cfg)
    with torch.no_grad():
        before = model(*inputs())
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=DEFAULT_TARGET_MODULES + ("proj_out",)))
    # 3 blocks x (8 attention + 2 x 2 FFN) + the final block without text params (6 + 2: its add_q_proj's output
    # is discarded, so it is not adapted) + proj_out
    assert len(names) == 3 * 12 + 8 + 1
    with torch.no_grad():
        assert torch.equal(model(*inputs()), before)


def test_only_adapters_require_grad_and_get_grads():
    model = base_model(small_config())
    apply_lora(model, LoRAConfig(r=4))
    randomize_adapters(model)
    model(*inputs()).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)


def test_merged_weights_equal_unmerged_adapters():
    cfg = small_config()
    model = base_model(cfg)
    base_sd = local_state_dict(model)
    config = LoRAConfig(r=4, alpha=2.0, target_modules=("to_q", "to_out.0", "ff.net.0.proj", "norm1.linear",
                                                        "skip_norm_linear.0.1"))
    apply_lora(model, config)
    adapters = randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(*inputs())
    merged = SparseUMMDiT(cfg).train()
    load_merged_state_dict(merged, merge_lora(base_sd, adapters, config.scaling))
    with torch.no_grad():
        out = merged(*inputs())
    torch.testing.assert_close(out, unmerged, **TOL)
    assert not torch.allclose(out, SparseUMMDiT(cfg)(*inputs()), **TOL) and (out - unmerged).abs().max() < 1e-5


def test_unknown_target_is_refused_with_did_you_mean():
    model = base_model(small_config())
    with pytest.raises(ValueError, match=r"'to_qq' \(did you mean 'to_q'.*targetable names: .*attn1\.to_q"):
        apply_lora(model, LoRAConfig(r=4, target_modules=("to_q", "to_qq")))
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed


def test_adapter_split_rules():
    assert tp_split_dim("transformer_blocks.0.0.attn1.to_q.lora_B") == 0
    assert tp_split_dim("transformer_blocks.0.0.attn1.to_q.lora_A") is None
    assert tp_split_dim("transformer_blocks.0.0.attn1.to_out.0.lora_A") == 1
    assert tp_split_dim("transformer_blocks.0.0.ff.net.2.lora_B") is None
    assert tp_split_dim("proj_out.lora_A") is None and tp_split_dim("proj_out.lora_B") is None


def test_mismatched_base_is_refused_naming_the_fields():
    config = LoRAConfig(r=4, alpha=8)
    meta = lora_metadata(config, small_config())
    assert check_base(meta, small_config(from_pretrained="elsewhere.pt"), "ckpt") == config
    other = dataclasses.replace(small_config(), num_heads=8, double_ff=False)
    with pytest.raises(ValueError, match=r"ckpt: .*another base.*double_ff: adapters True, base False; "
                                         r"num_heads: adapters 4, base 8"):
        check_base(meta, other, "ckpt")


@pytest.mark.parametrize("kwargs,match", [(dict(r=0), "--lora-r"), (dict(r=4, alpha=0), "--lora-alpha"),
                                          (dict(r=4, dropout=1.0), "--lora-dropout"),
                                          (dict(r=4, target_modules=()), "--lora-target-modules")])
def test_invalid_lora_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def _parse(*flags):
    from mindspeed_mm_osp.training.arguments import parse_args

    return parse_args(["--mm-data", "d.json", "--mm-model", "m.json", "--train-iters", "1", *flags])


def test_lora_flags():
    args = _parse("--lora-r", "16", "--lora-alpha", "32", "--lora-target-modules", "to_q", "ff.net.2",
                  "--load", "base.pt", "--lora-load", "ckpt")
    assert args.lora_config() == LoRAConfig(r=16, alpha=32.0, target_modules=("to_q", "ff.net.2"))
    assert (args.load, args.lora_load) == ("base.pt", "ckpt")
    assert _parse().lora_config() is None


@pytest.mark.parametrize("flags,message", [
    (("--lora-alpha", "8"), "--lora-alpha need --lora-r"),
    (("--lora-load", "x"), "--lora-load need --lora-r"),
    (("--lora-r", "0"), "--lora-r=0 must be a positive integer"),
    (("--lora-r", "4", "--lora-dropout", "1.5"), "--lora-dropout=1.5 must lie in"),
])
def test_bad_lora_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        _parse(*flags)
    assert message in capsys.readouterr().err


def test_lora_launcher_flags_parse(tmp_path):
    from helpers import launcher_argv

    from mindspeed_mm_osp.training.arguments import parse_args

    argv = launcher_argv(tmp_path, "examples/opensoraplan1.5/finetune_lora_opensoraplan1_5.sh")
    args = parse_args(argv, world_size=16)
    assert args.lora_config() == LoRAConfig(r=64, alpha=64.0)  # the default targets, spelled out in the script
    assert args.load.endswith("model_ema.pt") and args.lora_load == args.save == str(tmp_path / "proj")
    assert args.tensor_model_parallel_size == 4 and args.sequence_parallel and args.bf16
