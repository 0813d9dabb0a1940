"""LoRA adapter checkpoints: adapters only (plus training state) in the Megatron layout at TP=2+SP, refused for a
base of another config or another LoRA config, and folded into the base by `convert_mm_to_ckpt.py --lora-merge`
(merged output == unmerged adapters, 1e-5; `--target-tp 2` shards merge back to the same weights), or applied
unmerged at inference at another TP size."""

import dataclasses

import pytest
import torch

from mindspeed_mm_osp.checkpoint import convert
from mindspeed_mm_osp.checkpoint.layout import CheckpointError, model_file
from mindspeed_mm_osp.config.lora import LoRAConfig
from mindspeed_mm_osp.inference.weights import apply_adapters
from mindspeed_mm_osp.models.lora import apply_lora, load_lora_state_dict, lora_metadata, lora_state_dict
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, local_state_dict, shard_state_dict
from mindspeed_mm_osp.testing import run_distributed, tiny_predictor_config

LORA = LoRAConfig(r=4, alpha=8.0)


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([3.0, 731.5]), torch.randn(2, 7, 24, generator=g),
            None, None, torch.randn(2, 16, generator=g))


def _save_and_reload(rank, world_size, cfg, base, adapters, save_dir):
    from mindspeed_mm_osp.checkpoint import load_checkpoint, save_checkpoint
    from mindspeed_mm_osp.optim import build_optimizer
    from mindspeed_mm_osp.optim.megatron import OptimizerSettings
    from mindspeed_mm_osp.training.components import wrap_ddp

    def build(config, lora):
        model = SparseUMMDiT(config, sequence_parallel=True).train()
        load_merged_state_dict(model, base)
        apply_lora(model, lora)
        ddp = wrap_ddp(model, type("Args", (), dict(overlap_grad_reduce=False, use_distributed_optimizer=True)))
        return model, ddp, build_optimizer(ddp, OptimizerSettings())

    model, ddp, optimizer = build(cfg, LORA)
    load_lora_state_dict(model, shard_state_dict(adapters, rank, world_size), "test")
    optimizer.reload_model_params()
    meta = lora_metadata(LORA, cfg)
    path = save_checkpoint(save_dir, 5, ddp, optimizer, lora=meta)
    saved = torch.load(path, weights_only=False)
    errors = {}
    other_base = dataclasses.replace(cfg, norm_eps=1e-5)  # same shapes, another model
    for label, config, lora in (("base", other_base, LORA), ("lora", cfg, dataclasses.replace(LORA, alpha=4.0))):
        other, other_ddp, other_opt = build(config, lora)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(save_dir, other_ddp, other_opt, lora=lora_metadata(lora, config))
        errors[label] = str(info.value)
    with pytest.raises(CheckpointError) as info:  # a full-model run cannot resume from adapters
        plain = SparseUMMDiT(cfg, sequence_parallel=True)
        load_checkpoint(save_dir, wrap_ddp(plain, type("Args", (), dict(overlap_grad_reduce=False,
                                                                         use_distributed_optimizer=False))))
    errors["plain"] = str(info.value)
    return sorted(saved["model"]), sorted(saved["ema_model"]), sorted(saved["optimizer"]["state"]), errors


@pytest.mark.slow  # ~13 s: a TP=2 save and three reloads, four conversions
def test_adapter_checkpoint_and_lora_merge(tmp_path):
    cfg = tiny_predictor_config()
    torch.manual_seed(0)
    model = SparseUMMDiT(cfg).eval()
    base = local_state_dict(model)
    apply_lora(model, LORA)
    g = torch.Generator().manual_seed(1)
    adapters = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, adapters, "test")
    with torch.no_grad():
        unmerged = model(*inputs())

    ckpt = tmp_path / "lora"
    ranks = run_distributed(_save_and_reload, 2, cfg, base, adapters, ckpt, tp=2)
    model_keys, ema_keys, optim_keys, errors = ranks[0]
    assert model_keys == ema_keys == optim_keys == sorted(shard_state_dict(adapters, 0, 2))  # adapters only
    assert "another base model" in errors["base"] and "norm_eps: adapters 1e-06, base 1e-05" in errors["base"]
    assert "another LoRA config" in errors["lora"] and "alpha: checkpoint 8.0, this run 4.0" in errors["lora"]
    assert "holds LoRA adapters only" in errors["plain"]
    assert model_file(ckpt, 5, 0).stat().st_size < 0.25 * sum(v.numel() * 4 for v in base.values())

    # inference: unmerged adapters from the TP=2 checkpoint on a TP=1 model, scaled by --lora-scale
    for scale, expected in ((1.0, unmerged), (0.0, None)):
        infer = SparseUMMDiT(cfg).eval()
        load_merged_state_dict(infer, base)
        with torch.no_grad():
            base_out = infer(*inputs())
            assert len(apply_adapters(infer, ckpt, scale)) == len(adapters) // 2 and not infer.training
            torch.testing.assert_close(infer(*inputs()), base_out if expected is None else expected,
                                       rtol=1e-5, atol=1e-5)

    base_file = tmp_path / "base.pt"
    torch.save(base, base_file)
    convert.main(["--lora-merge", "--load_dir", str(ckpt), "--base", str(base_file), "--save_dir",
                  str(tmp_path / "merged"), "--format", "pt"])
    merged = torch.load(tmp_path / "merged" / "model.pt", weights_only=True)
    plain = SparseUMMDiT(cfg).eval()
    load_merged_state_dict(plain, merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(*inputs()), unmerged, rtol=1e-5, atol=1e-5)

    convert.main(["--lora-merge", "--ema", "--load_dir", str(ckpt), "--base", str(base_file), "--save_dir",
                  str(tmp_path / "tp2"), "--target-tp", "2"])
    shards = [torch.load(model_file(tmp_path / "tp2", 5, r), weights_only=False)["model"] for r in range(2)]
    resplit = convert.merge_shards(shards)
    assert all(torch.equal(resplit[k], merged[k]) for k in merged)  # EMA of never-stepped adapters = adapters

    wrong = {k: v for k, v in base.items() if "proj_out" not in k}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(SystemExit, match=r"not the model the adapters were trained on.*missing \['proj_out"):
        convert.main(["--lora-merge", "--load_dir", str(ckpt), "--base", str(tmp_path / "wrong.pt"),
                      "--save_dir", str(tmp_path / "x")])
