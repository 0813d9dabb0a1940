"""LoRA at TP=2 (with and without sequence parallelism) equals TP=1: A's init, outputs, adapter grads (summed by
megatron's `finalize_model_grads` over a megatron DDP whose base params are frozen), and merged weights loaded
at TP=2 give the unmerged adapters' output."""

import pytest
import torch

from mindspeed_mm_osp.config.lora import DEFAULT_TARGET_MODULES, LoRAConfig
from mindspeed_mm_osp.config.predictor import RecomputeConfig
from mindspeed_mm_osp.models.lora import apply_lora, load_lora_state_dict, lora_state_dict, merge_lora
from mindspeed_mm_osp.models.predictor import (
    SparseUMMDiT,
    load_merged_state_dict,
    local_state_dict,
    merge_state_dicts,
    shard_state_dict,
    tp_split_dim,
)
from mindspeed_mm_osp.testing import (
    TINY_PREDICTOR,
    ddp_outputs_and_grads,
    perturb_parameters,
    run_distributed,
    tiny_predictor_config,
)

SMALL = dict(TINY_PREDICTOR, num_layers=[1, 2, 1], final_block_text_params=True)
TOL = dict(rtol=1e-5, atol=1e-5)
# every kind of layer: column (SP and replicated-input adaLN), row, replicated plain linears (tagged skip, proj_out)
LORA = LoRAConfig(r=4, alpha=8.0, target_modules=DEFAULT_TARGET_MODULES + ("norm1.linear", "skip_norm_linear.0.1",
                                                                           "proj_out"))


def case(seed, height):  # L = 3*2*3 = 18 or 3*1*3 = 9 video tokens (odd: SP pads), 7 text tokens
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 3, height, 6)
    mask[1, -1] = 0
    text_mask = torch.ones(2, 7)
    text_mask[1, -2:] = 0
    x = (torch.randn(2, 4, 3, height, 6, generator=g), torch.tensor([3.0, 731.5]), torch.randn(2, 7, 24, generator=g),
         mask, text_mask, torch.randn(2, 16, generator=g))
    return x, torch.randn(2, 4, 3, height, 6, generator=g)


CASES = [case(0, 4), case(1, 2)]


def reference():
    """TP=1 without torch.distributed: base, initial adapters, random adapters, outputs and adapter grads."""
    cfg = tiny_predictor_config(SMALL)
    torch.manual_seed(0)
    model = SparseUMMDiT(cfg).train()
    g = torch.Generator().manual_seed(1)
    perturb_parameters(model, g)
    base = local_state_dict(model)
    apply_lora(model, LORA)
    init = lora_state_dict(model)
    adapters = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init.items()}
    load_lora_state_dict(model, adapters, "reference")
    results = []
    for inputs, weight in CASES:
        model.zero_grad(set_to_none=True)
        out = model(*inputs)
        (out * weight).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    return cfg, base, init, adapters, results


def _rank(rank, world_size, cfg, base, adapters, sequence_parallel, recompute):
    model = SparseUMMDiT(cfg, sequence_parallel=sequence_parallel, recompute=recompute).train()
    load_merged_state_dict(model, base)
    apply_lora(model, LORA)
    init = lora_state_dict(model)
    load_lora_state_dict(model, shard_state_dict(adapters, rank, world_size), "test")
    results = ddp_outputs_and_grads(model, CASES)
    assert not any(hasattr(p, "main_grad") for p in model.parameters() if not p.requires_grad)  # frozen base
    # the merged base + adapters, loaded at TP=2 without LoRA, gives the unmerged adapters' output
    merged = SparseUMMDiT(cfg, sequence_parallel=sequence_parallel).eval()
    load_merged_state_dict(merged, merge_lora(base, adapters, LORA.scaling))
    model.eval()
    with torch.no_grad():
        merge_gap = max((merged(*x) - model(*x)).abs().max().item() for x, _ in CASES)
    return init, results, merge_gap


@pytest.mark.parametrize("sequence_parallel,recompute", [
    (False, None), (True, None), (True, RecomputeConfig(selective_ffn_layers=4)),
    (True, RecomputeConfig(granularity="full", num_layers=4))], ids=["tp", "tp-sp", "tp-sp-ffn-recompute",
                                                                    "tp-sp-full-recompute"])
def test_lora_tp2_matches_tp1(sequence_parallel, recompute):
    cfg, base, ref_init, adapters, expected = reference()
    ranks = run_distributed(_rank, 2, cfg, base, adapters, sequence_parallel, recompute, tp=2)
    init = merge_state_dicts([r[0] for r in ranks])
    assert init.keys() == ref_init.keys() and all(torch.equal(init[k], ref_init[k]) for k in init)
    for c, (ref_out, ref_grads) in enumerate(expected):
        for _, results, _ in ranks:
            torch.testing.assert_close(results[c][0], ref_out, **TOL)
        grads = merge_state_dicts([{k.replace(".base.", "."): v for k, v in r[1][c][1].items()} for r in ranks])
        assert grads.keys() == {k.replace(".base.", "."): None for k in ref_grads}.keys()
        for name, ref in ref_grads.items():
            assert ref.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], ref, **TOL, msg=lambda m, name=name: f"case {c} {name}: {m}")
            if tp_split_dim(name) is None:  # replicated adapters must not drift apart across TP ranks
                torch.testing.assert_close(ranks[1][1][c][1][name], ranks[0][1][c][1][name], **TOL)
    assert max(r[2] for r in ranks) < 1e-5
