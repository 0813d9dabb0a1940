"""TeaCache-style step caching: threshold 0 is the plain sampler bit for bit; larger thresholds skip the block
stack on a deterministic set of steps (never the first or the last) shared by the cond/uncond halves."""

import pytest
import torch

from mindspeed_mm_osp.diffusion import FlowMatchingScheduler, sample
from mindspeed_mm_osp.diffusion.step_cache import StepCache
from mindspeed_mm_osp.config import DiffusionConfig
from mindspeed_mm_osp.models.predictor import SparseUMMDiT
from mindspeed_mm_osp.testing import perturb_parameters, tiny_predictor_config

STEPS = 12


@pytest.fixture(scope="module")
def model() -> SparseUMMDiT:
    torch.manual_seed(0)
    m = SparseUMMDiT(tiny_predictor_config()).eval()
    return perturb_parameters(m)


def conditioning(batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[:, 4:] = 0
    return {"encoder_hidden_states": torch.randn(batch, 6, 24, generator=g), "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(batch, 16, generator=g)}


def run(model, model_fn, batch=1):
    noise = torch.randn(batch, 4, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    sigmas = FlowMatchingScheduler(DiffusionConfig(shift=3.0)).sampling_sigmas(STEPS)
    return sample(model_fn, noise, conditioning(batch, 1), conditioning(batch, 2), sigmas=sigmas,
                  guidance_scale=4.5, guidance_rescale=0.7)


def test_threshold_zero_is_the_plain_sampler_bit_for_bit(model):
    cache = StepCache(model, 0.0, STEPS)
    assert torch.equal(run(model, cache, batch=2), run(model, model, batch=2))
    assert cache.skipped == [] and cache.step == STEPS


def test_huge_threshold_skips_every_step_but_the_first_and_the_last(model):
    cache = StepCache(model, 1e9, STEPS)
    cached = run(model, cache)
    assert cache.skipped == list(range(1, STEPS - 1))
    assert not torch.allclose(cached, run(model, model))


def test_moderate_threshold_is_deterministic_and_refreshes(model):
    first, second = StepCache(model, 0.3, STEPS), StepCache(model, 0.3, STEPS)
    a, b = run(model, first), run(model, second)
    assert torch.equal(a, b) and first.skipped == second.skipped
    assert 0 < len(first.skipped) < STEPS - 2  # some skipped, some refreshed
    assert 0.0 < first.skipped_fraction < 1.0


def test_skipped_step_reuses_the_residual_with_the_current_head(model):
    """On a skipped step the prediction is head(x_now + last residual) under the current timestep."""
    cache = StepCache(model, 1e9, 3)
    x0, x1 = torch.randn(2, 1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = conditioning(1, 1)
    cache(x0, torch.tensor([900.0]), **cond)
    v1 = cache(x1, torch.tensor([600.0]), **cond)
    assert cache.skipped == [1]
    with torch.no_grad():
        first = model.embed(x0, torch.tensor([900.0]), **cond)
        residual = model.run_blocks(first.x, first.c, first) - first.x
        now = model.embed(x1, torch.tensor([600.0]), **cond)
        expected = model.head(now.x + residual, now)
    torch.testing.assert_close(v1, expected, rtol=1e-6, atol=1e-6)


def test_negative_threshold_is_rejected(model):
    with pytest.raises(ValueError, match="threshold"):
        StepCache(model, -0.1, STEPS)
