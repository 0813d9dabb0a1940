"""Ulysses context parallelism: CP=2 and TP=2 x CP=2 (with and without SP) equal TP=1 CP=1 on the same weights.

Forward outputs and gradients, on two shapes (L=18 and L=9 video tokens: 9 is not divisible by CP=2, 18 not by
TP x CP = 4), sparse and dense blocks, masked text and video tokens. Gradients are reduced as in training:
megatron-core DDP over the DP x CP group (mean) with the loss scaled by `loss_scale_for_grads()`, then
`finalize_model_grads`.
"""

import pytest
import torch

from mindspeed_mm_osp.config.predictor import RecomputeConfig
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, merge_state_dicts, tp_split_dim
from mindspeed_mm_osp.models.predictor import sparseu_mmdit
from mindspeed_mm_osp.testing import ddp_outputs_and_grads, run_distributed
from helpers import CASES, CONFIG_A, CONFIG_B, TOL, reference, tiny_config


def _cp_rank(rank, world_size, cfg, full_sd, sequence_parallel, recompute):
    from megatron.core import parallel_state as ps

    from mindspeed_mm_osp.parallel.context_parallel import loss_scale_for_grads

    model = SparseUMMDiT(cfg, sequence_parallel=sequence_parallel, recompute=recompute).train()
    load_merged_state_dict(model, full_sd)
    results = ddp_outputs_and_grads(model, CASES, loss_scale=loss_scale_for_grads())
    return ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(), results


def run_and_compare(cfg, tp, cp, sequence_parallel=False, recompute=None):
    full_sd, expected = reference(cfg)
    ranks = run_distributed(_cp_rank, tp * cp, cfg, full_sd, sequence_parallel, recompute, tp=tp, cp=cp)
    assert sorted((t, c) for t, c, _ in ranks) == [(t, c) for t in range(tp) for c in range(cp)]
    for case, (ref_out, ref_grads) in enumerate(expected):
        for _, _, results in ranks:
            torch.testing.assert_close(results[case][0], ref_out, **TOL)  # full output on every rank
        for c in range(cp):  # every CP rank holds the full (DP x CP reduced) gradient
            shards = [results[case][1] for t in range(tp) for tr, cr, results in ranks if (tr, cr) == (t, c)]
            grads = merge_state_dicts(shards)
            assert grads.keys() == ref_grads.keys()
            for name, ref in ref_grads.items():
                torch.testing.assert_close(grads[name], ref, **TOL,
                                           msg=lambda m, name=name: f"case {case} cp rank {c} {name}: {m}")
                if tp_split_dim(name) is None:
                    torch.testing.assert_close(shards[-1][name], shards[0][name], **TOL)


@pytest.mark.parametrize("overrides,tp,cp,sequence_parallel,recompute", [
    (CONFIG_A, 1, 2, False, None),
    (CONFIG_B, 1, 2, False, RecomputeConfig(granularity="full", num_layers=7)),
    (CONFIG_A, 2, 2, False, None),
    (CONFIG_B, 2, 2, True, None),
], ids=["A-cp2", "B-cp2-full-recompute", "A-tp2-cp2", "B-tp2-cp2-sp"])
def test_cp_matches_single_rank(overrides, tp, cp, sequence_parallel, recompute):
    run_and_compare(tiny_config(**overrides), tp, cp, sequence_parallel, recompute)


def test_local_rope_positions_break_the_equivalence(monkeypatch):
    """The comparison above is sensitive to the position handling: RoPE tables restarting at 0 in every CP shard
    (what applying RoPE before the all-to-all without an offset would do) make it fail."""
    cfg = tiny_config(**CONFIG_A)  # unpatched, this setting passes (test_cp_matches_single_rank[A-cp2])
    real = sparseu_mmdit.rope_3d_tables

    def shard_local_tables(t, h, w, *args):
        cos, sin = real(t, h, w, *args)
        shard = -(-cos.shape[0] // 2)
        local = torch.arange(cos.shape[0]) % shard
        return cos[local], sin[local]

    full_sd, expected = reference(cfg)
    monkeypatch.setattr(sparseu_mmdit, "rope_3d_tables", shard_local_tables)  # inherited by the forked ranks
    ranks = run_distributed(_cp_rank, 2, cfg, full_sd, False, None, cp=2)
    for case, (ref_out, _) in enumerate(expected):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(ranks[0][2][case][0], ref_out, **TOL)


def test_heads_must_divide_tp_times_cp():
    def build(rank, world_size):
        SparseUMMDiT(tiny_config(num_heads=2, head_dim=32))

    with pytest.raises(Exception, match=r"num_heads=2 .* --tensor-model-parallel-size=2 x --context-parallel-size=2"):
        run_distributed(build, 4, tp=2, cp=2)
