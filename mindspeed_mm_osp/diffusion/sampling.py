"""Euler sampling of the velocity field with classifier-free guidance (docs/model.md, "Flow matching and sampling").

The model is any callable `model_fn(x, timestep, **cond) -> velocity`, so inference can
plug the TP-sharded DiT and tests a closed-form field. Guidance, rescale and the Euler
update run in fp32 (the reference does them in fp16); latents keep their dtype between
steps.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

ModelFn = Callable[..., torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def apply_guidance(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float,
                   guidance_rescale: float = 0.0) -> torch.Tensor:
    """v_u + g*(v_c - v_u), then (if rescale phi > 0) blend with its copy rescaled so that its
    per-sample standard deviation (unbiased, over all non-batch dims) equals v_c's:
    phi * v * std(v_c)/std(v) + (1 - phi) * v. Computed in fp32."""
    v_uncond, v_cond = v_uncond.float(), v_cond.float()
    v = v_uncond + guidance_scale * (v_cond - v_uncond)
    if guidance_rescale > 0.0:
        dims = list(range(1, v.ndim))
        ratio = v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True)
        v = guidance_rescale * (v * ratio) + (1.0 - guidance_rescale) * v
    return v


def _batch_with_uncond(cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor]) -> dict:
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    return {k: torch.cat([uncond[k], cond[k]]) for k in cond}


@torch.no_grad()
def sample(model_fn: ModelFn, latents: torch.Tensor, cond: Mapping[str, torch.Tensor],
           uncond: Optional[Mapping[str, torch.Tensor]] = None, *, sigmas: torch.Tensor,
           guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
           callback: Optional[StepCallback] = None,
           constrain: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Integrate from sigma = sigmas[0] (noise) to sigmas[-1]: x += (s_{i+1} - s_i) * v.

    cond / uncond: keyword tensors for `model_fn` with batch first (e.g.
    encoder_hidden_states, encoder_attention_mask, pooled_projections). Guidance is on iff
    `uncond` is given and `guidance_scale > 1`; then both halves go through ONE forward, the
    negative/unconditional first ([uncond; cond]), and the timestep is 1000*sigma_i (fp32)
    for every row. A NaN prediction raises. `constrain(latents, sigma_next)` (e.g. keeping
    given frames on their path) is applied after every update, then `callback(step,
    num_steps, latents)` runs.
    """
    guided = uncond is not None and guidance_scale > 1.0
    model_cond = _batch_with_uncond(cond, uncond) if guided else dict(cond)
    sigmas = sigmas.to(device=latents.device, dtype=torch.float32)
    num_steps = sigmas.numel() - 1
    for i in range(num_steps):
        x_in = torch.cat([latents, latents]) if guided else latents
        timestep = (sigmas[i] * 1000.0).expand(x_in.shape[0])
        v = model_fn(x_in, timestep, **model_cond)
        if torch.isnan(v).any():
            raise FloatingPointError(f"the model predicted NaN at step {i} (sigma {sigmas[i].item():.6f})")
        if guided:
            v_uncond, v_cond = v.chunk(2)
            v = apply_guidance(v_uncond, v_cond, guidance_scale, guidance_rescale)
        latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(latents.dtype)
        if constrain is not None:
            latents = constrain(latents, sigmas[i + 1])
        if callback is not None:
            callback(i, num_steps, latents)
    return latents
