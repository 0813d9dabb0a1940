"""Sampling schedule, CFG + guidance rescale and the Euler loop (docs/model.md, "Flow matching and sampling")."""

import numpy as np
import pytest
import torch

from mindspeed_mm_osp.config import ConfigError, DiffusionConfig, from_dict
from mindspeed_mm_osp.diffusion import FlowMatchingScheduler, apply_guidance, linear_quadratic_schedule, sample


def test_shift7_50_steps_matches_spec_vectors():
    sigmas = FlowMatchingScheduler(DiffusionConfig(shift=7.0)).sampling_sigmas(50)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    np.testing.assert_allclose(sigmas[:5].numpy(), [1.0, 0.997093, 0.994083, 0.990964, 0.987730], atol=1e-6)
    np.testing.assert_allclose(sigmas[-5:].numpy(), [0.378378, 0.308824, 0.225806, 0.125, 0.0], atol=1e-6)
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_shift_one_is_linspace_and_dynamic_needs_the_shape():
    torch.testing.assert_close(FlowMatchingScheduler(DiffusionConfig()).sampling_sigmas(10),
                               torch.linspace(1, 0, 11))
    dyn = FlowMatchingScheduler(DiffusionConfig(use_dynamic_shifting=True))
    with pytest.raises(ValueError):
        dyn.sampling_sigmas(10)
    s = 2.331861012694066  # 576x1024 -> latent 72x128
    lin = np.linspace(1, 0, 11)
    np.testing.assert_allclose(dyn.sampling_sigmas(10, (72, 128)).numpy(), s * lin / (1 + (s - 1) * lin), atol=1e-7)


@pytest.mark.parametrize("steps", [50, 20, 100, 150])
def test_linear_quadratic_schedule_formula(steps):
    approx = min(max(10 * steps, 250), 1000)
    n, a = steps // 2, approx // 2
    removed = [i / (2 * a) for i in range(n)]
    for i in range(n, 2 * n):
        removed.append((a - n) / (a * n * n) * i * i + (5 * n - 4 * a) / (2 * a * n) * i + (a - n) / a)
    expected = 1.0 - np.array(removed + [1.0])
    got = linear_quadratic_schedule(steps)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert got[0] == 1.0 and got[-1] == 0.0 and np.all(np.diff(got) < 0)
    # continuous where the linear part hands over to the quadratic one
    np.testing.assert_allclose(got[n], 1 - n / (2 * a), atol=1e-12)


def test_linear_quadratic_is_unshifted_in_the_scheduler():
    cfg = DiffusionConfig(shift=7.0, use_linear_quadratic_schedule=True, num_inference_steps=50)
    got = FlowMatchingScheduler(cfg).sampling_sigmas()
    np.testing.assert_allclose(got.numpy(), linear_quadratic_schedule(50).astype(np.float32))
    with pytest.raises(ConfigError):
        from_dict(DiffusionConfig, {"use_linear_quadratic_schedule": True, "num_inference_steps": 49})


def _rescale_by_hand(v_u, v_c, g, phi):
    v = v_u.double() + g * (v_c.double() - v_u.double())
    out = torch.empty_like(v)
    for i in range(v.shape[0]):
        c, x = v_c[i].double().flatten(), v[i].flatten()
        std_c = torch.sqrt(((c - c.mean()) ** 2).sum() / (c.numel() - 1))   # unbiased
        std_v = torch.sqrt(((x - x.mean()) ** 2).sum() / (x.numel() - 1))
        out[i] = phi * v[i] * (std_c / std_v) + (1 - phi) * v[i]
    return out


@pytest.mark.parametrize("g,phi", [(8.0, 0.7), (4.5, 0.0), (2.0, 1.0)])
def test_guidance_and_rescale_match_hand_computation(g, phi):
    gen = torch.Generator().manual_seed(0)
    v_u = torch.randn(3, 4, 2, 3, 3, generator=gen).half()
    v_c = (torch.randn(3, 4, 2, 3, 3, generator=gen) * 2 + 1).half()
    got = apply_guidance(v_u, v_c, g, phi)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _rescale_by_hand(v_u, v_c, g, phi), rtol=1e-5, atol=1e-5)


class Recorder:
    """A linear velocity field that records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, timestep, encoder_hidden_states, pooled_projections):
        self.calls.append((x.clone(), timestep.clone(), encoder_hidden_states.clone(), pooled_projections.clone()))
        scale = encoder_hidden_states.mean(dim=(1, 2)) + pooled_projections.mean(dim=1)
        return 0.5 * x + scale.view(-1, 1, 1, 1, 1) * (timestep / 1000).view(-1, 1, 1, 1, 1)


def _conds(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(batch, 5, 4, generator=gen),
            "pooled_projections": torch.randn(batch, 3, generator=gen)}


def test_cfg_sampling_one_forward_per_step_uncond_first():
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 2, 3, 3, generator=gen)
    cond, uncond = _conds(2, 2), _conds(2, 3)
    sigmas = FlowMatchingScheduler(DiffusionConfig(shift=7.0)).sampling_sigmas(6)
    model = Recorder()
    seen = []
    out = sample(model, latents, cond, uncond, sigmas=sigmas, guidance_scale=8.0, guidance_rescale=0.7,
                 callback=lambda i, n, x: seen.append((i, n)))
    assert len(model.calls) == 6 and seen == [(i, 6) for i in range(6)]

    x = latents.clone()
    for i, (x_in, t, ehs, pooled) in enumerate(model.calls):
        assert x_in.shape[0] == 4 and torch.equal(x_in[:2], x_in[2:])
        torch.testing.assert_close(x_in[:2], x, rtol=1e-5, atol=1e-5)
        assert torch.equal(ehs[:2], uncond["encoder_hidden_states"]) and torch.equal(ehs[2:], cond["encoder_hidden_states"])
        assert torch.equal(pooled[:2], uncond["pooled_projections"])
        assert t.dtype == torch.float32 and torch.equal(t, (sigmas[i] * 1000).expand(4))
        v = model.__class__()(x_in, t, ehs, pooled)
        guided = _rescale_by_hand(v[:2], v[2:], 8.0, 0.7).float()
        x = x + (sigmas[i + 1] - sigmas[i]) * guided
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_no_guidance_runs_the_conditional_batch_only():
    latents = torch.randn(2, 4, 1, 2, 2)
    model = Recorder()
    sigmas = torch.linspace(1, 0, 4)
    sample(model, latents, _conds(2, 0), _conds(2, 1), sigmas=sigmas, guidance_scale=1.0)
    sample(model, latents, _conds(2, 0), None, sigmas=sigmas, guidance_scale=8.0)
    assert all(call[0].shape[0] == 2 for call in model.calls) and len(model.calls) == 6


def test_exact_velocity_recovers_the_data_point():
    """For a single data point x0 the true velocity is (x - x0)/sigma, so Euler is exact."""
    x0 = torch.randn(1, 4, 2, 3, 3)
    latents = torch.randn(1, 4, 2, 3, 3).half()
    sigmas = FlowMatchingScheduler(DiffusionConfig(shift=7.0)).sampling_sigmas(10)
    out = sample(lambda x, t: ((x.float() - x0) / (t / 1000).view(-1, 1, 1, 1, 1)).half(), latents, {},
                 sigmas=sigmas)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), x0, rtol=0, atol=2e-2)


def test_nan_prediction_raises():
    with pytest.raises(FloatingPointError):
        sample(lambda x, t: torch.full_like(x, float("nan")), torch.zeros(1, 2, 1, 1, 1), {},
               sigmas=torch.linspace(1, 0, 3))
