"""Flow-matching schedules, CFG and the Euler sampler against the reference scheduler's own numbers
(tests/golden/scheduler.json, see the README there).

Configs are the reference's `diffusion` blocks read by our config loader. Sigma schedules are computed in float64
and cast, so they must be bitwise equal; the guidance, Euler and sampling-loop results are fp32 arithmetic in the
reference's order and are held to fp32 rounding (measured: bitwise equal).
"""

import pytest
import torch

from mindspeed_mm_osp.config import from_dict
from mindspeed_mm_osp.config.diffusion import DiffusionConfig
from mindspeed_mm_osp.diffusion import FlowMatchingScheduler, apply_guidance, sample, shift_sigmas
from golden.reference import read_json

GOLDEN = read_json("scheduler.json")


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _scheduler(block: dict) -> FlowMatchingScheduler:
    """The reference block minus its device entry (ours picks the device elsewhere)."""
    config = {k: v for k, v in block.items() if k != "device"}
    return FlowMatchingScheduler(from_dict(DiffusionConfig, config, file="scheduler.json", path="diffusion"))


def _exact(ours: torch.Tensor, ref) -> None:
    torch.testing.assert_close(ours, _t(ref), rtol=0, atol=0)


def _fp32(ours: torch.Tensor, ref) -> None:
    torch.testing.assert_close(ours, _t(ref), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name, latent_hw", [("static_shift", None), ("linear_quadratic", None),
                                             ("extra_dynamic_shift_inference_latent_72x128", (72, 128))])
def test_sampling_sigmas_and_timesteps(name, latent_hw):
    """Static shift 7 (the release inference block), linear-quadratic (unshifted) and dynamic shift at 72x128."""
    entry = GOLDEN["sampling_schedule"][name]
    sigmas = _scheduler(entry["config"]).sampling_sigmas(latent_hw=latent_hw)
    _exact(sigmas, entry["sigmas_float32"])
    _exact(FlowMatchingScheduler.timesteps(sigmas)[:-1], entry["timesteps_float32"])


def test_training_dynamic_shift_per_resolution():
    """shift = exp(mu(H*W/4)) ignores the latent frame count; applied to a sigma grid in fp32."""
    entry = GOLDEN["training_dynamic_shift"]
    scheduler = _scheduler(entry["config"])
    grid = _t(entry["example_sigma_grid_float32"])
    for size in entry["latent_sizes"]:
        _, h, w = size["latent_thw"]
        assert scheduler.shift_for((h, w)) == pytest.approx(size["shift"], rel=1e-15)
        _exact(shift_sigmas(grid, scheduler.shift_for((h, w))), size["shifted_grid_float32"])


def test_logit_normal_training_sigmas():
    """sigmoid of the normal draw, shifted for the resolution; with torch's seed-0 stream the drawn sigmas are the
    reference's own."""
    entry = GOLDEN["logit_normal_sigmas"]
    scheduler = _scheduler(GOLDEN["training_dynamic_shift"]["config"])
    draws = _t(entry["normal_draws_float32"])
    for size in entry["per_latent_size"]:
        _, h, w = size["latent_thw"]
        shifted = shift_sigmas(torch.sigmoid(draws), scheduler.shift_for((h, w)))
        _exact(shifted, size["shifted_sigmas_float32"])
        _exact(scheduler.timesteps(shifted), size["timesteps_float32"])
    seeded = entry["extra_torch_manual_seed_0"]
    sigmas = scheduler.sample_sigmas(8, latent_hw=(72, 128), generator=torch.Generator().manual_seed(0))
    _exact(sigmas, seeded["shifted_for_latent_16x72x128_float32"])


def test_guidance_with_rescale():
    entry = GOLDEN["cfg_guidance_rescale"]
    uncond, cond = _t(entry["noise_pred_uncond"]), _t(entry["noise_pred_cond"])
    _fp32(apply_guidance(uncond, cond, entry["guidance_scale"]), entry["cfg_before_rescale"])
    _fp32(apply_guidance(uncond, cond, entry["guidance_scale"], entry["guidance_rescale"]), entry["result"])


def test_one_euler_step():
    entry = GOLDEN["euler_step"]
    i = entry["step_index"]
    sigmas = _scheduler(entry["scheduler_config"]).sampling_sigmas()
    assert (sigmas[i].item(), sigmas[i + 1].item()) == (entry["sigma"], entry["sigma_next"])
    out = sample(lambda x, t: _t(entry["model_output"]), _t(entry["sample"]), {}, sigmas=sigmas[i:i + 2])
    _fp32(out, entry["prev_sample"])


def test_fifty_step_guided_sampling_of_a_toy_field():
    """The reference's 50-step loop (shift 7, CFG 8, rescale 0.7) on a closed-form velocity field that reads the
    latents and the timestep: uncond 0.9x - 0.2, cond x + 0.3 t/1000."""
    entry = GOLDEN["extra_toy_sampling_loop"]
    scheduler = _scheduler(entry["scheduler_config"])
    sigmas, config = scheduler.sampling_sigmas(), scheduler.config

    def field(x, timestep, prompt):
        xu, xc = x.chunk(2)
        tc = timestep.chunk(2)[1]
        return torch.cat([0.9 * xu - 0.2, xc + 0.3 * (tc / 1000.0).view(-1, 1, 1, 1, 1)])

    prompt = {"prompt": torch.zeros(1)}
    out = sample(field, _t(entry["initial_latents"]), prompt, prompt, sigmas=sigmas,
                 guidance_scale=config.guidance_scale, guidance_rescale=config.guidance_rescale)
    _fp32(out, entry["final_latents"])
