"""CFG-parallel sampling (uncond / cond on two rank groups) equals batched CFG: world 2 (TP=1) and TP=2 x CFG=2
(world 4), with and without the step cache (whose skip decisions the pair shares)."""

import pytest
import torch

from mindspeed_mm_osp.config import DiffusionConfig
from mindspeed_mm_osp.diffusion import FlowMatchingScheduler, sample
from mindspeed_mm_osp.diffusion.step_cache import StepCache
from mindspeed_mm_osp.inference.cfg_parallel import cfg_parallel_model_fn, init_cfg_parallel
from mindspeed_mm_osp.models.predictor import SparseUMMDiT, load_merged_state_dict, local_state_dict
from mindspeed_mm_osp.parallel import ParallelDims
from mindspeed_mm_osp.testing import perturb_parameters, run_distributed, tiny_predictor_config

STEPS = 6


def _weights() -> dict:
    torch.manual_seed(0)
    model = SparseUMMDiT(tiny_predictor_config())
    perturb_parameters(model)
    return local_state_dict(model)


def _cond(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    return {"encoder_hidden_states": torch.randn(2, 6, 24, generator=g), "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(2, 16, generator=g)}


def _compare(rank, world_size, weights, tp, threshold):
    model = SparseUMMDiT(tiny_predictor_config(), sequence_parallel=tp > 1).eval()
    load_merged_state_dict(model, weights)
    cfg = init_cfg_parallel(ParallelDims.current())
    noise = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    kwargs = dict(sigmas=FlowMatchingScheduler(DiffusionConfig(shift=3.0)).sampling_sigmas(STEPS),
                  guidance_scale=4.5, guidance_rescale=0.7)

    def model_fn(group=None):
        return model if threshold is None else StepCache(model, threshold, STEPS, group=group)

    batched_fn, split_inner = model_fn(), model_fn(cfg.group)
    batched = sample(batched_fn, noise, _cond(1), _cond(2), **kwargs)
    split = sample(cfg_parallel_model_fn(split_inner, cfg), noise, _cond(1), _cond(2), **kwargs)
    skipped = (getattr(batched_fn, "skipped", None), getattr(split_inner, "skipped", None))
    return batched, split, cfg.branch, cfg.num_replicas, skipped


@pytest.mark.parametrize("world_size,tp,threshold", [(2, 1, None), (4, 2, None), (2, 1, 0.15)])
def test_cfg_parallel_latents_equal_batched_cfg(world_size, tp, threshold):
    results = run_distributed(_compare, world_size, _weights(), tp, threshold, tp=tp, timeout=300)
    assert sorted(r[2] for r in results) == [0] * (world_size // 2) + [1] * (world_size // 2)
    assert all(r[3] == 1 for r in results)
    for batched, split, _, _, (skipped_batched, skipped_split) in results:
        torch.testing.assert_close(split, batched, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split, results[0][1], rtol=0, atol=0)  # every rank holds the same latents
        assert skipped_split == skipped_batched
    if threshold is not None:
        assert 0 < len(results[0][4][0]) < STEPS - 2


def _odd(rank, world_size):
    init_cfg_parallel(ParallelDims.current())


def test_odd_data_parallel_size_is_rejected():
    with pytest.raises(Exception, match="even data-parallel size"):
        run_distributed(_odd, 2, tp=2)


def _cached(rank, world_size, weights, threshold):
    model = SparseUMMDiT(tiny_predictor_config(), sequence_parallel=True).eval()
    load_merged_state_dict(model, weights)
    return _sample_cached(model, threshold)


def _sample_cached(model, threshold):
    cache = StepCache(model, threshold, STEPS)
    noise = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    latents = sample(cache, noise, _cond(1), _cond(2), guidance_scale=4.5, guidance_rescale=0.7,
                     sigmas=FlowMatchingScheduler(DiffusionConfig(shift=3.0)).sampling_sigmas(STEPS))
    return latents, cache.skipped


def test_step_cache_decisions_agree_across_tp_and_cp_ranks():
    """TP=2 (SP) x CP=2: every rank skips the same steps as one process and ends with its latents."""
    weights = _weights()
    model = SparseUMMDiT(tiny_predictor_config()).eval()
    load_merged_state_dict(model, weights)
    expected, skipped = _sample_cached(model, 0.15)
    assert 0 < len(skipped) < STEPS - 2
    for latents, got in run_distributed(_cached, 4, weights, 0.15, tp=2, cp=2, timeout=300):
        assert got == skipped
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
