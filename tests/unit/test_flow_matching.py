"""Flow-matching training maths (docs/model.md, "Flow matching and sampling")."""

import math

import pytest
import torch

from mindspeed_mm_osp.config import DiffusionConfig
from mindspeed_mm_osp.diffusion import FlowMatchingScheduler, dynamic_shift_mu, image_seq_len, shift_sigmas

N = 200_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("latent_hw,seq,mu,shift", [
    ((72, 128), 2304, 0.846667, 2.33186),   # 576x1024
    ((36, 64), 576, 0.554167, 1.74049),     # 288x512
    ((32, 32), 256, 0.5, 1.64872),          # 256x256
])
def test_dynamic_shift_values(latent_hw, seq, mu, shift):
    cfg = DiffusionConfig(use_dynamic_shifting=True)
    assert image_seq_len(latent_hw) == seq
    assert dynamic_shift_mu(seq, cfg) == pytest.approx(mu, abs=1e-6)
    assert FlowMatchingScheduler(cfg).shift_for(latent_hw) == pytest.approx(shift, abs=1e-5)


def test_shift_formula_and_eps_floor():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    s = 3.0
    expected = s * sigmas / (1 + (s - 1) * sigmas)
    torch.testing.assert_close(shift_sigmas(sigmas, s), expected)
    # The reference's dynamic form exp(mu) / (exp(mu) + 1/sigma - 1), away from sigma = 0.
    torch.testing.assert_close(shift_sigmas(sigmas[1:], s), s / (s + 1 / sigmas[1:] - 1))
    assert shift_sigmas(sigmas, s, sigma_eps=1e-3)[0] == 1e-3
    torch.testing.assert_close(shift_sigmas(sigmas, 1.0), sigmas)


def test_logit_normal_statistics_after_dynamic_shift():
    """logit(shifted sigma) = u + mu exactly, so it is N(logit_mean + mu, logit_std)."""
    cfg = DiffusionConfig(use_dynamic_shifting=True, logit_mean=0.2, logit_std=0.8)
    sigmas = FlowMatchingScheduler(cfg).sample_sigmas(N, (72, 128), generator=_gen()).double()
    logits = torch.log(sigmas / (1 - sigmas))
    assert logits.mean().item() == pytest.approx(0.2 + 0.846667, abs=0.01)
    assert logits.std().item() == pytest.approx(0.8, abs=0.01)


def test_logit_normal_unshifted():
    sigmas = FlowMatchingScheduler(DiffusionConfig()).sample_sigmas(N, generator=_gen())
    assert sigmas.dtype == torch.float32 and sigmas.shape == (N,)
    assert sigmas.mean().item() == pytest.approx(0.5, abs=0.005)
    logits = torch.logit(sigmas.double())
    assert logits.mean().item() == pytest.approx(0.0, abs=0.01)
    assert logits.std().item() == pytest.approx(1.0, abs=0.01)


def test_sampling_is_reproducible_from_the_generator():
    sched = FlowMatchingScheduler(DiffusionConfig(use_dynamic_shifting=True))
    a = sched.sample_sigmas(8, (36, 64), generator=_gen(3))
    assert torch.equal(a, sched.sample_sigmas(8, (36, 64), generator=_gen(3)))
    # latent frames play no role: only H_lat, W_lat enter.
    u = torch.normal(0.0, 1.0, size=(8,), generator=_gen(3))
    s = math.exp(dynamic_shift_mu(576, sched.config))
    torch.testing.assert_close(a, s * torch.sigmoid(u) / (1 + (s - 1) * torch.sigmoid(u)))


def test_mode_and_uniform_densities():
    mode = FlowMatchingScheduler(DiffusionConfig(weighting_scheme="mode", mode_scale=1.29))
    got = mode.sample_sigmas(16, generator=_gen(1))
    u = torch.rand(16, generator=_gen(1))
    torch.testing.assert_close(got, 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))
    for scheme in ("uniform", "sigma_sqrt", "cosmap", "none"):
        sigmas = FlowMatchingScheduler(DiffusionConfig(weighting_scheme=scheme)).sample_sigmas(N, generator=_gen())
        assert sigmas.mean().item() == pytest.approx(0.5, abs=0.005)
        assert sigmas.var().item() == pytest.approx(1 / 12, abs=0.002)


def test_static_shift_and_eps_in_training():
    cfg = DiffusionConfig(weighting_scheme="uniform", shift=3.0, sigma_eps=0.005)
    got = FlowMatchingScheduler(cfg).sample_sigmas(1000, generator=_gen(2))
    u = torch.rand(1000, generator=_gen(2))
    torch.testing.assert_close(got, (3 * u / (1 + 2 * u)).clamp_min(0.005))


def test_add_noise_target_and_timesteps():
    sched = FlowMatchingScheduler(DiffusionConfig())
    g = _gen(4)
    x0 = torch.randn(3, 4, 2, 3, 5, generator=g).to(torch.bfloat16)
    noise = torch.randn(3, 4, 2, 3, 5, generator=g)
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    xt = sched.add_noise(x0, noise, sigmas)
    assert xt.dtype == torch.bfloat16
    s = sigmas.view(3, 1, 1, 1, 1)
    assert torch.equal(xt, (s * noise + (1 - s) * x0.float()).to(torch.bfloat16))
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2].to(torch.bfloat16))
    assert torch.equal(sched.training_target(x0.float(), noise), noise - x0.float())
    t = sched.timesteps(torch.tensor([0.0, 0.1234, 1.0]))
    assert t.dtype == torch.float32 and torch.allclose(t, torch.tensor([0.0, 123.4, 1000.0]))


def _masked_reference(pred, target, mask, weights=None):
    """Loop form of the loss: per-element error, mask broadcast over C, global normalisation."""
    total, count = 0.0, 0.0
    b, c = pred.shape[:2]
    for i in range(b):
        w = 1.0 if weights is None else float(weights[i])
        for ch in range(c):
            err = w * (pred[i, ch].double() - target[i, ch].double()) ** 2
            total += float((err * mask[i].double()).sum())
            count += float(mask[i].double().sum())
    return total / count


def test_masked_loss_matches_hand_computation():
    g = _gen(5)
    pred, target = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    mask = torch.ones(2, 2, 4, 4)
    mask[0, 1] = 0          # padded latent frame of sample 0
    mask[1, :, 3:, :] = 0   # padded latent rows of sample 1
    sched = FlowMatchingScheduler(DiffusionConfig())
    loss = sched.loss(pred, target, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_masked_reference(pred, target, mask), rel=1e-6)
    plain = ((pred - target) ** 2).mean()
    torch.testing.assert_close(sched.loss(pred, target, torch.ones(2, 2, 4, 4)), plain)
    torch.testing.assert_close(sched.loss(pred, target, None), plain)
    # bf16 predictions are compared in fp32
    torch.testing.assert_close(sched.loss(pred.bfloat16(), target, mask),
                               sched.loss(pred.bfloat16().float(), target, mask))


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_weighted_loss(scheme):
    g = _gen(6)
    pred, target = torch.randn(2, 3, 1, 2, 2, generator=g), torch.randn(2, 3, 1, 2, 2, generator=g)
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    sigmas = torch.tensor([0.3, 0.8])
    w = sigmas ** -2.0 if scheme == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    sched = FlowMatchingScheduler(DiffusionConfig(weighting_scheme=scheme))
    assert sched.loss(pred, target, mask, sigmas).item() == pytest.approx(
        _masked_reference(pred, target, mask, w), rel=1e-6)
    with pytest.raises(ValueError):
        sched.loss(pred, target, mask)
    assert torch.equal(FlowMatchingScheduler(DiffusionConfig()).loss_weights(sigmas), torch.ones(2))
