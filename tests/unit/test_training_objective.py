"""The training objective as wired: `flow_matching_loss` (what the trainer calls per micro-batch) with a fixed
stand-in predictor equals a masked MSE written out here by hand.

Everything the expected value needs is derived in this file from the release's training `diffusion` block:
sigma = shift(sigmoid(n)) with n the generator's first draws and shift = exp(mu(H*W/4)), then the noise; the
model input x = sigma * noise + (1 - sigma) * x0 at timestep 1000 * sigma; the target is the velocity noise - x0;
the mean runs over the valid latents only. Swapping or negating the target, noising with the wrong weights or
normalising the mask differently changes the value.
"""

import math

import pytest
import torch

from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.diffusion import DiffusionConfig
from mindspeed_mm_osp.diffusion import FlowMatchingScheduler
from mindspeed_mm_osp.training.step import EncodedBatch, flow_matching_loss

# the release training block: logit-normal sigmas with the resolution-dependent shift
RELEASE_TRAINING = {"model_id": "OpenSoraPlan", "weighting_scheme": "logit_normal", "use_dynamic_shifting": True}
SHAPE = (2, 4, 3, 8, 12)  # (B, C, t, h, w): 8*12/4 = 24 tokens per frame


def _batch() -> EncodedBatch:
    g = torch.Generator().manual_seed(11)
    mask = torch.ones(SHAPE[0], *SHAPE[2:])
    mask[1, -1] = 0            # a padded last frame
    mask[1, 0, :4, :6] = 0     # and a padded corner
    return EncodedBatch(latents=torch.randn(SHAPE, generator=g), latent_mask=mask,
                        text=torch.randn(SHAPE[0], 5, 8, generator=g), text_mask=torch.ones(SHAPE[0], 5),
                        pooled=torch.randn(SHAPE[0], 16, generator=g))


def _by_hand(enc: EncodedBatch, seed: int):
    """(sigma, noise, target) from the generator's stream: B standard-normal draws, then the noise."""
    g = torch.Generator().manual_seed(seed)
    n = torch.normal(0.0, 1.0, size=(SHAPE[0],), generator=g)
    noise = torch.randn(SHAPE, generator=g)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (SHAPE[3] * SHAPE[4] // 4 - 256)
    s, u = math.exp(mu), torch.sigmoid(n)
    sigma = s * u / (1 + (s - 1) * u)
    return sigma, noise, noise - enc.latents


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[:, None].expand_as(pred)
    return ((pred - target) ** 2 * weights).sum() / weights.sum()


def test_loss_is_the_masked_velocity_mse_at_the_drawn_sigma():
    scheduler = FlowMatchingScheduler(from_dict(DiffusionConfig, RELEASE_TRAINING))
    enc, seen = _batch(), {}

    def stand_in(**inputs):
        """A fixed map of its input, so the loss depends on what the model was given."""
        seen.update(inputs)
        return 0.5 * inputs["hidden_states"] - 0.25

    loss = flow_matching_loss(stand_in, scheduler, enc, torch.Generator().manual_seed(3), torch.float32)

    sigma, noise, target = _by_hand(enc, seed=3)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = s * noise + (1 - s) * enc.latents
    torch.testing.assert_close(seen["timestep"], 1000 * sigma, rtol=1e-6, atol=0)
    torch.testing.assert_close(seen["hidden_states"], x_t, rtol=1e-6, atol=1e-6)
    expected = _masked_mse(0.5 * x_t - 0.25, target, enc.latent_mask)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    # the test can see the bugs it is named after: each moves the value far outside the tolerance
    for wrong in (enc.latents - noise, noise + enc.latents):
        assert abs(_masked_mse(0.5 * x_t - 0.25, wrong, enc.latent_mask) - expected) > 0.1 * expected
    unmasked = ((0.5 * x_t - 0.25 - target) ** 2).mean()
    assert abs(unmasked - expected) > 1e-3 * expected


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["oracle", "negated-oracle"])
def test_a_perfect_predictor_has_zero_loss_and_its_negation_four_times_the_target_energy(sign):
    """A stand-in returning exactly noise - x0 (recovered from its input and timestep) scores 0; returning its
    negation scores 4 * mean(target^2). Only the right target and noising give both."""
    scheduler = FlowMatchingScheduler(from_dict(DiffusionConfig, RELEASE_TRAINING))
    enc = _batch()

    def oracle(hidden_states, timestep, **_):
        s = (timestep / 1000).view(-1, 1, 1, 1, 1)
        noise = (hidden_states - (1 - s) * enc.latents) / s
        return sign * (noise - enc.latents)

    loss = flow_matching_loss(oracle, scheduler, enc, torch.Generator().manual_seed(5), torch.float32)
    _, _, target = _by_hand(enc, seed=5)
    expected = 0.0 if sign > 0 else 4 * _masked_mse(torch.zeros_like(target), target, enc.latent_mask).item()
    assert loss.item() == pytest.approx(expected, abs=1e-4)
