"""TP=2 (with and without sequence parallelism) equals TP=1 on the same weights: outputs and gradients.

Replicated-parameter grads under SP are synchronised by megatron's own `finalize_model_grads` over a megatron
`DistributedDataParallel` wrapper (what the training loop does), which sums the grads of params tagged
`sequence_parallel=True` over TP. q/k RMSNorm weights are summed inside autograd (see `HeadRMSNorm`).
"""

import pytest
import torch

from mindspeed_mm_osp.config.predictor import RecomputeConfig
from mindspeed_mm_osp.models.predictor import (
    SparseUMMDiT,
    load_merged_state_dict,
    local_state_dict,
    merge_state_dicts,
    tp_split_dim,
)
from mindspeed_mm_osp.testing import ddp_outputs_and_grads, run_distributed
from helpers import CASES, CONFIG_A, CONFIG_B, I2V, I2V_CASES, TOL, reference, tiny_config


def _tp_rank(rank, world_size, cfg, full_sd, sequence_parallel, recompute, cases=CASES):
    model = SparseUMMDiT(cfg, sequence_parallel=sequence_parallel, recompute=recompute).train()
    load_merged_state_dict(model, full_sd)
    return ddp_outputs_and_grads(model, cases), local_state_dict(model)


@pytest.mark.parametrize("overrides,sequence_parallel,recompute", [
    (CONFIG_A, False, None), (CONFIG_A, True, None), (CONFIG_B, False, None), (CONFIG_B, True, None),
    (CONFIG_A, True, RecomputeConfig(granularity="full", num_layers=7)),
    (CONFIG_B, True, RecomputeConfig(selective_ffn_layers=14)),
    ({**CONFIG_A, **I2V}, True, None),
], ids=["A-tp", "A-tp-sp", "B-tp", "B-tp-sp", "A-tp-sp-full-recompute", "B-tp-sp-ffn-recompute", "i2v-tp-sp"])
def test_tp2_matches_tp1(overrides, sequence_parallel, recompute):
    cfg = tiny_config(**overrides)
    cases = I2V_CASES if cfg.conditioned else CASES
    full_sd, expected = reference(cfg, cases)
    ranks = run_distributed(_tp_rank, 2, cfg, full_sd, sequence_parallel, recompute, cases, tp=2)
    for case, (ref_out, ref_grads) in enumerate(expected):
        for rank_results, _ in ranks:
            torch.testing.assert_close(rank_results[case][0], ref_out, **TOL)  # full output on every rank
        grads = merge_state_dicts([rank_results[case][1] for rank_results, _ in ranks])
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, **TOL, msg=lambda m, name=name: f"case {case} {name}: {m}")
            if tp_split_dim(name) is None:  # replicated params must not drift apart across TP ranks
                torch.testing.assert_close(ranks[1][0][case][1][name], ranks[0][0][case][1][name], **TOL)
    # the TP=2 ranks' gathered state dict is the TP=1 state dict (TP=1 -> TP=2 loading, round trip)
    merged = merge_state_dicts([sd for _, sd in ranks])
    assert merged.keys() == full_sd.keys() and all(torch.equal(merged[k], full_sd[k]) for k in full_sd)


def _tp_init_rank(rank, world_size, cfg, inputs):
    torch.manual_seed(123)
    model = SparseUMMDiT(cfg, sequence_parallel=True).eval()
    with torch.no_grad():
        return model(*inputs), local_state_dict(model)


def test_tp1_loads_tp2_state_dict():
    """A model initialised at TP=2 (per-rank shards), gathered, loads into TP=1 and gives the same output."""
    cfg = tiny_config(final_block_text_params=True)
    inputs = CASES[0][0]
    ranks = run_distributed(_tp_init_rank, 2, cfg, inputs, tp=2)
    tp1 = SparseUMMDiT(cfg).eval()
    load_merged_state_dict(tp1, merge_state_dicts([sd for _, sd in ranks]))
    with torch.no_grad():
        torch.testing.assert_close(tp1(*inputs), ranks[0][0], **TOL)
