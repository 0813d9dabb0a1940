"""The building blocks of text-to-video sampling that `runner.InferenceRunner` calls stage by stage: prompt files,
T5/CLIP conditioning, seeded noise, Euler CFG denoising with the (TP-sharded) SparseUMMDiT, latents files.

Each block takes plain values (texts, tensors, sigmas, scales), not the config: the runner reads the config and
hands every block what it needs, so a setting can be followed from the flags to its use in one file.

Differences from the reference implementation, on purpose:
* noise comes from a CPU generator seeded with `seed + prompt_index`, in fp32, then moved: identical on every
  TP rank by construction and independent of batch size, DP size and device;
* latents stay fp32 between steps (the predictor runs in `weight_dtype`); guidance and the Euler step are fp32;
* the guidance scale applied is the one configured (the reference applied the scheduler's and used the call
  argument only to decide whether to build negatives);
* blank lines of a prompt file are skipped (the reference sampled them as empty prompts);
* the T5 length is `model_max_length` (512 in the release JSON; the reference ignored the key and hard-coded 512).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..diffusion import sample
from ..diffusion.step_cache import StepCache
from .cfg_parallel import CfgParallelGroup, cfg_parallel_model_fn
from .conditioning import InpaintCondition

LATENTS_KEY = "latents"


def load_prompts(source: str) -> list[str]:
    """One prompt per non-blank line when `source` is an existing file, else `source` itself."""
    path = Path(source)
    if path.is_file():
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError(f"prompt file {path} has no non-blank line")
        return prompts
    return [source]


class TextConditioner:
    """Tokenizers and T5/CLIP encoders: texts -> the predictor's conditioning keywords."""

    def __init__(self, encoders: torch.nn.Module, tokenizer, tokenizer_2, max_length: int):
        self.encoders, self.tokenizer, self.tokenizer_2 = encoders, tokenizer, tokenizer_2
        self.max_length = max_length  # T5 tokens (512 for the release); CLIP always uses 77

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        from ..models.text import CLIP_MAX_LENGTH, tokenize

        ids, mask = tokenize(texts, self.tokenizer, self.max_length)
        ids_2 = tokenize(texts, self.tokenizer_2, CLIP_MAX_LENGTH)[0] if self.tokenizer_2 is not None else None
        hidden, mask, pooled = self.encoders.encode(ids, mask, ids_2)
        if pooled is None:
            raise ValueError("SparseUMMDiT needs CLIP pooled embeddings: configure text_encoder_2 and tokenizer_2")
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask, "pooled_projections": pooled}


def initial_noise(shape: tuple[int, ...], seed: int, indices: Sequence[int]) -> torch.Tensor:
    """(B, *shape) standard normal fp32 on CPU; row b from a generator seeded with `seed + indices[b]`."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices])


@torch.no_grad()
def denoise(model: torch.nn.Module, noise: torch.Tensor, cond: dict[str, torch.Tensor],
            uncond: Optional[dict[str, torch.Tensor]], sigmas: torch.Tensor, guidance_scale: float,
            guidance_rescale: float = 0.0, callback: Optional[Callable[[int, int, torch.Tensor], None]] = None, *,
            step_cache: Optional[StepCache] = None, cfg_parallel: Optional[CfgParallelGroup] = None,
            condition: Optional[InpaintCondition] = None) -> torch.Tensor:
    """Clean latents (fp32, on the model's device) from `noise`; one forward per step for [uncond; cond].

    `step_cache` (built on `model`) replaces the plain forward; `cfg_parallel` runs only this rank's half of
    the [uncond; cond] batch and gathers the other half from its CFG peer; `condition` (image-to-video, see
    `conditioning`) is concatenated to the model input and may keep the given latent frames on their path.
    """
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    predictor = model if step_cache is None else step_cache
    guided = guidance_scale > 1.0
    if cfg_parallel is not None and not (guided and uncond is not None):
        raise ValueError("--cfg-parallel needs classifier-free guidance (guidance_scale > 1 and negative prompts)")

    def to_model(c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in c.items()}

    def model_fn(x: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
        if condition is not None:
            x = condition.model_input(x)
        return predictor(x.to(dtype), timestep, **kwargs).float()

    if cfg_parallel is not None:
        model_fn = cfg_parallel_model_fn(model_fn, cfg_parallel)
    return sample(model_fn, noise.to(device=device, dtype=torch.float32), to_model(cond),
                  to_model(uncond) if guided and uncond is not None else None,
                  sigmas=sigmas, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                  callback=callback, constrain=None if condition is None else condition.constrain)


# ------------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class SavedLatents:
    latents: torch.Tensor  # (C, t, h, w) fp32
    record: dict  # prompt and settings (what the JSON sidecar holds)


def save_latents(path: Path, latents: torch.Tensor, record: dict) -> Path:
    """One sample's latents (C, t, h, w) as safetensors; prompt and settings as JSON in the metadata."""
    from ..io_atomic import atomic_save_safetensors

    atomic_save_safetensors({LATENTS_KEY: latents.detach().float().cpu()}, path, {"record": json.dumps(record)})
    return path


def load_latents(path: Path) -> SavedLatents:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if LATENTS_KEY not in f.keys() or "record" not in meta:
            raise ValueError(f"{path}: not a latents file written by --save-latents (no '{LATENTS_KEY}' tensor "
                             "or 'record' metadata)")
        return SavedLatents(f.get_tensor(LATENTS_KEY), json.loads(meta["record"]))


__all__ = ["LATENTS_KEY", "SavedLatents", "TextConditioner", "denoise", "initial_noise", "load_latents", "load_prompts",
           "save_latents"]
