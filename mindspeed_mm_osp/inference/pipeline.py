"""Text-to-video sampling, stage by stage (vae_diffusion_inference.md §5): prompts -> T5/CLIP conditioning ->
seeded noise -> Euler CFG denoising with the (TP-sharded) SparseUMMDiT -> chunked WF-VAE decode -> mp4.

Each stage is a function so the CLI can stop after denoising (`--save-latents`), decode later without text
encoders or predictor (`--decode-latents`), and time every stage (`--benchmark`).

Differences from the reference, on purpose:
* noise comes from a CPU generator seeded with `seed + prompt_index`, in fp32, then moved: identical on every
  TP rank by construction and independent of batch size, DP size and device;
* latents stay fp32 between steps (the predictor runs in `weight_dtype`); guidance and the Euler step are fp32;
* the guidance scale applied is the one configured (the reference applied the scheduler's and used the call
  argument only to decide whether to build negatives);
* blank lines of a prompt file are skipped (the reference sampled them as empty prompts);
* the T5 length is `model_max_length` (512 in the release JSON; the reference ignored the key and hard-coded 512).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..config import InferenceConfig
from ..diffusion import FlowMatchingScheduler, sample
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


def prepare_texts(prompts: Sequence[str], negative_prompt: Optional[str], version: str) -> tuple[list[str], list[str]]:
    """(positive, negative) texts after the prompt template and caption cleaning, one pair per prompt."""
    from ..models.text import apply_prompt_template, clean_caption

    pairs = [apply_prompt_template(p, negative_prompt, version) for p in prompts]
    return [clean_caption(p) for p, _ in pairs], [clean_caption(n) for _, n in pairs]


class TextConditioner:
    """Tokenizers and T5/CLIP encoders: texts -> the predictor's conditioning keywords."""

    def __init__(self, cfg: InferenceConfig, dtype: torch.dtype, device: torch.device):
        from ..models.text import TextEncoders, load_tokenizer

        if (cfg.text_encoder_2 is None) != (cfg.tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 must both be given or both be absent")
        text_encoder = dataclasses.replace(cfg.text_encoder,
                                           use_attention_mask=cfg.pipeline_config.use_attention_mask)
        self.encoders = TextEncoders.from_config(text_encoder, cfg.text_encoder_2, dtype=dtype).to(device)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.tokenizer_2 = load_tokenizer(cfg.tokenizer_2) if cfg.tokenizer_2 is not None else None
        self.max_length = cfg.model_max_length  # T5 tokens (512 for the release); CLIP always uses 77

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        from ..models.text import CLIP_MAX_LENGTH, tokenize

        ids, mask = tokenize(texts, self.tokenizer, self.max_length)
        ids_2 = tokenize(texts, self.tokenizer_2, CLIP_MAX_LENGTH)[0] if self.tokenizer_2 is not None else None
        hidden, mask, pooled = self.encoders.encode(ids, mask, ids_2)
        if pooled is None:
            raise ValueError("SparseUMMDiT needs CLIP pooled embeddings: configure text_encoder_2 and tokenizer_2")
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask, "pooled_projections": pooled}


def latent_shape(cfg: InferenceConfig) -> tuple[int, int, int, int]:
    """(C, t, h, w) of the requested `pipeline_config.input_size`, from the config alone (no VAE needed)."""
    frames, height, width = cfg.pipeline_config.input_size
    ft, fh, fw = cfg.ae.vae_scale_factor
    return cfg.ae.latent_dim, (frames - 1) // ft + 1, height // fh, width // fw


def initial_noise(shape: tuple[int, ...], seed: int, indices: Sequence[int]) -> torch.Tensor:
    """(B, *shape) standard normal fp32 on CPU; row b from a generator seeded with `seed + indices[b]`."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices])


def sampling_sigmas(cfg: InferenceConfig) -> torch.Tensor:
    _, _, h, w = latent_shape(cfg)
    return FlowMatchingScheduler(cfg.diffusion).sampling_sigmas(latent_hw=(h, w))


@torch.no_grad()
def denoise(model: torch.nn.Module, noise: torch.Tensor, cond: dict[str, torch.Tensor],
            uncond: Optional[dict[str, torch.Tensor]], cfg: InferenceConfig,
            callback: Optional[Callable[[int, int, torch.Tensor], None]] = None, *,
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
    guided = cfg.diffusion.guidance_scale > 1.0
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
                  sigmas=sampling_sigmas(cfg), guidance_scale=cfg.diffusion.guidance_scale,
                  guidance_rescale=cfg.diffusion.guidance_rescale, callback=callback,
                  constrain=None if condition is None else condition.constrain)


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor,
           group: Optional["torch.distributed.ProcessGroup"] = None) -> Optional[torch.Tensor]:
    """(B, C, t, h, w) latents -> (B, 3, T, H, W) videos in [-1, 1] (fp32, CPU).

    With `group` the decode is spread over its ranks (all must call) and the video returned on its rank 0 only.
    """
    param = next(vae.parameters())
    video = vae.decode(latents.to(param.device), group)
    return None if video is None else video.float().clamp(-1, 1).cpu()


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


def write_video(save_dir: Path, stem: str, video: torch.Tensor, fps: float, record: dict) -> Path:
    """`<stem>.mp4` (H.264) and its `<stem>.json` sidecar, each written atomically."""
    from .video_io import to_uint8_frames, write_json_atomic, write_mp4

    path = write_mp4(save_dir / f"{stem}.mp4", to_uint8_frames(video), fps)
    write_json_atomic(save_dir / f"{stem}.json", {**record, "video": path.name})
    return path


__all__ = ["LATENTS_KEY", "SavedLatents", "TextConditioner", "decode", "denoise", "initial_noise", "latent_shape",
           "load_latents", "load_prompts", "prepare_texts", "sampling_sigmas", "save_latents", "write_video"]
