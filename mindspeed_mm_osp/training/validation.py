"""Validation during training: a loss at fixed noise levels on held-out samples, and videos sampled with the EMA.

Neither may change training: every random generator training draws from (torch, accelerator, megatron's tracker,
numpy, python) is saved before and restored after (`preserved_rng`), the model's train/eval mode is restored, and
all validation randomness comes from generators keyed by (seed, purpose, sample, noise level), independent of the
training stream and of the parallel layout. So a run with validation trains exactly as one without.

Validation loss (`--eval-interval`, `--mm-valid-data`): the first `--eval-iters` x global batch samples of the
validation set in annotation order (all of them by default), one at a time, each at `--eval-sigmas` evenly spaced
sigmas (k + 1/2) / K with the same noise every time. Sample i is computed by data-parallel replica i mod DP; the
per-sample losses are summed over the replicas and divided by the sample count, so the result is the same masked
mean whatever the TP/SP/CP/DP layout.

Validation samples (`--validation-prompts`, `--validation-interval`): the prompts are sampled with the EMA weights
swapped into the model (and the training weights copied back bit-exactly afterwards) by the inference pipeline's
own blocks (`inference.pipeline`), then decoded and written as mp4 by the first rank of each replica.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import platform
from ..config import ConfigError, DataConfig, ModelConfig
from ..diffusion import FlowMatchingScheduler
from ..models.text.preprocess import PROMPT_VERSION
from ..parallel import ParallelDims
from .args import TrainingArgs
from .arguments import ArgumentError, parse_size
from .step import EncodedBatch, LossRegion, encode_batch, keyed_generator, velocity_loss


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Every generator the training stream draws from (those a checkpoint saves) is as before when the block ends."""
    from ..checkpoint.checkpointing import rng_state, set_rng_state

    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode (no dropout) without autograd, back in its former mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def validation_sigmas(count: int) -> torch.Tensor:
    """`count` evenly spaced noise levels (k + 1/2) / count, k = 0..count-1: no level is pure data or pure noise."""
    return (torch.arange(count, dtype=torch.float64) + 0.5).div(count).float()


# -- validation loss -----------------------------------------------------------------------------------------------


class ValidationSet:
    """The held-out samples of `--mm-valid-data`: read, captioned and encoded the same way at every evaluation
    (no caption drop, keyed frame windows and posterior samples); this replica's share is samples i = DP rank mod DP."""

    def __init__(self, data_cfg: DataConfig, model_file: str, encoders, dims: ParallelDims, *, seed: int,
                 limit: Optional[int]):
        from ..data.collate import GroupLengthCollate
        from ..data.dataset import T2VDataset
        from ..data.loader import build_index_from_config
        from ..data.readers import make_video_reader
        from ..models.text import load_tokenizer

        if encoders.text is None or encoders.vae is None:
            raise ConfigError(model_file, "load_text_features" if encoders.text is None else "load_video_features",
                              "--mm-valid-data is read and encoded online (VAE, T5/CLIP); training from cached "
                              "features builds neither: drop --mm-valid-data or train online")
        dp = data_cfg.dataset_param
        # global batch 0: no shape is too rare to validate on (the minority rule is about forming training batches)
        index, _ = build_index_from_config(data_cfg, global_batch_size=0)
        dp = dataclasses.replace(dp, preprocess_parameters=dataclasses.replace(dp.preprocess_parameters, cfg=0.0))
        tokenizer_2 = load_tokenizer(dp.tokenizer_config_2) if dp.tokenizer_config_2 else None
        self.dataset = T2VDataset(index, dp, tokenizer=load_tokenizer(dp.tokenizer_config), tokenizer_2=tokenizer_2,
                                  video_reader=make_video_reader(dp.preprocess_parameters.video_reader_type), seed=seed)
        self.collate = GroupLengthCollate(data_cfg.dataloader_param.collate_param)
        self.encoders, self.seed = encoders, seed
        self.size = len(index) if limit is None else min(limit, len(index))
        self.positions = range(dims.dp_rank, self.size, dims.dp)

    def encoded(self, position: int) -> EncodedBatch:
        from ..data.dataset import SampleKey

        batch = self.collate([self.dataset[SampleKey(position, 0, position)]])
        return encode_batch(self.encoders, batch, keyed_generator(self.seed, "validation-vae", position))


@dataclass(frozen=True)
class ValidationLoss:
    """Mean validation loss over `samples` samples, overall and per sigma."""

    loss: float
    per_sigma: dict[float, float]
    samples: int
    elapsed_s: float

    def scalars(self) -> dict[str, float]:
        """TensorBoard / W&B names: validation/loss and validation/loss-sigma-<sigma>."""
        return {"validation/loss": self.loss,
                **{f"validation/loss-sigma-{s:.4f}": v for s, v in self.per_sigma.items()}}

    def line(self, iteration: int) -> str:
        levels = ", ".join(f"{s:.3f}: {v:.4E}" for s, v in self.per_sigma.items())
        return (f"validation loss at iteration {iteration}: {self.loss:.6E} over {self.samples} samples "
                f"(per sigma {levels}) | took {self.elapsed_s:.1f} s")


def validation_loss(model: nn.Module, scheduler: FlowMatchingScheduler, data: ValidationSet, dims: ParallelDims, *,
                    sigmas: torch.Tensor, dtype: torch.dtype, loss_region: LossRegion) -> ValidationLoss:
    """The masked velocity MSE of every validation sample at every sigma, averaged over the samples (collective
    over the data-parallel group; TP/CP peers compute the same values)."""
    t0 = time.monotonic()
    sums = torch.zeros(len(sigmas), dtype=torch.float64)
    with preserved_rng(), eval_mode(model):
        for position in data.positions:
            enc = data.encoded(position)
            for k, sigma in enumerate(sigmas.tolist()):
                gen = keyed_generator(data.seed, "validation-noise", position, k)
                noise = torch.randn(enc.latents.shape, generator=gen, dtype=torch.float32).to(enc.latents.device)
                level = torch.full((enc.latents.shape[0],), sigma, dtype=torch.float32)
                sums[k] += float(velocity_loss(model, scheduler, enc, level, noise, dtype, loss_region))
    if dims.dp > 1:
        dist.all_reduce(sums, group=dims.dp_group)
    means = sums / max(data.size, 1)
    per_sigma = {round(s, 6): float(v) for s, v in zip(sigmas.tolist(), means)}
    return ValidationLoss(loss=float(means.mean()), per_sigma=per_sigma, samples=data.size,
                          elapsed_s=time.monotonic() - t0)


# -- validation samples --------------------------------------------------------------------------------------------


def check_size(size: tuple[int, int, int], model_cfg: ModelConfig) -> None:
    """The VAE and the patchify must be able to produce `size`: frames = 1 mod the temporal stride, sides a multiple
    of the spatial stride times the patch size."""
    ft, fh, fw = model_cfg.ae.vae_scale_factor
    patch = model_cfg.predictor.patch_size
    frames, height, width = size
    if (frames - 1) % ft or height % (fh * patch) or width % (fw * patch):
        raise ArgumentError(f"--validation-size {frames}x{height}x{width}: frames - 1 must be a multiple of {ft} and "
                            f"height and width multiples of {fh * patch} (VAE stride x patch size); e.g. "
                            f"{ft * 2 + 1}x{fh * patch * 4}x{fw * patch * 4}")


@contextlib.contextmanager
def ema_weights(ddp: nn.Module, optimizer) -> Iterator[None]:
    """The EMA weights in the model (collective: gathered from the optimizer's shards on every rank); the training
    weights, kept on the CPU meanwhile, are copied back bit-exactly when the block ends."""
    from ..models.wrappers import unwrap
    from ..optim.megatron import ema_state_dict

    ema = ema_state_dict(ddp, optimizer)
    params = dict(unwrap(ddp).named_parameters())
    kept = {name: params[name].detach().to("cpu", copy=True) for name in ema}
    try:
        with torch.no_grad():
            for name, value in ema.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in kept.items():
                params[name].copy_(value)


@dataclass(frozen=True)
class ValidationVideos:
    """Where one round of validation samples went, and how long training waited for it."""

    folder: Path
    elapsed_s: float

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("*.mp4"))

    def line(self, iteration: int, prompts: int) -> str:
        return (f"validation samples at iteration {iteration}: {prompts} prompt(s) with the EMA weights in "
                f"{self.folder} | took {self.elapsed_s:.1f} s of training time")


class ValidationSampler:
    """`--validation-prompts` sampled with the EMA weights: prompt i by data-parallel replica i mod DP, written as
    `<save>/validation/iter_XXXXXXX/<i>.mp4` (+ a JSON sidecar) by the replica's first rank."""

    def __init__(self, args: TrainingArgs, model_cfg: ModelConfig, data_cfg: DataConfig, encoders,
                 dims: ParallelDims):
        from ..inference.pipeline import TextConditioner, load_prompts
        from ..models.text import load_tokenizer

        if encoders.text is None or encoders.vae is None:
            raise ConfigError(args.mm_model, "load_text_features" if encoders.text is None else "load_video_features",
                              "--validation-prompts encodes prompts with T5/CLIP and decodes with the VAE; training "
                              "from cached features builds neither: drop --validation-prompts or train online")
        if model_cfg.predictor.conditioned:
            raise ConfigError(args.mm_model, "predictor.model_id", "--validation-prompts samples text-to-video; "
                              "image-to-video predictors are not sampled during training yet (use inference.py)")
        dp = data_cfg.dataset_param
        self.prompts = load_prompts(args.validation_prompts)
        tokenizer_2 = load_tokenizer(dp.tokenizer_config_2) if dp.tokenizer_config_2 else None
        self.text = TextConditioner(encoders.text, load_tokenizer(dp.tokenizer_config), tokenizer_2,
                                    dp.model_max_length)
        self.vae, self.dims, self.seed = encoders.vae, dims, args.seed
        pre = dp.preprocess_parameters
        self.size = (parse_size(args.validation_size) if args.validation_size
                     else (pre.num_frames, pre.max_height, pre.max_width))
        check_size(self.size, model_cfg)
        self.fps = float(pre.train_fps)
        diffusion = model_cfg.diffusion
        self.guidance = (diffusion.guidance_scale if args.validation_guidance_scale is None
                         else args.validation_guidance_scale)
        self.guidance_rescale = diffusion.guidance_rescale
        ft, fh, fw = model_cfg.ae.vae_scale_factor
        frames, height, width = self.size
        self.latent_shape = (model_cfg.ae.latent_dim, (frames - 1) // ft + 1, height // fh, width // fw)
        self.sigmas = FlowMatchingScheduler(diffusion).sampling_sigmas(args.validation_steps,
                                                                       latent_hw=self.latent_shape[2:])
        self.steps = args.validation_steps

    def mine(self) -> list[int]:
        return [i for i in range(len(self.prompts)) if i % self.dims.dp == self.dims.dp_rank]

    def latents(self, model: nn.Module, index: int) -> torch.Tensor:
        """(1, C, t, h, w) clean latents of prompt `index` (noise seeded by seed + index, as inference.py does)."""
        from ..inference.pipeline import denoise, initial_noise
        from ..inference.runner import prepare_texts

        positive, negative = prepare_texts([self.prompts[index]], None, PROMPT_VERSION)
        guided = self.guidance > 1.0
        emb = self.text.encode(negative + positive if guided else positive)
        cond = {k: v[-1:] for k, v in emb.items()}
        uncond = {k: v[:1] for k, v in emb.items()} if guided else None
        noise = initial_noise(self.latent_shape, self.seed, [index])
        return denoise(model, noise, cond, uncond, self.sigmas, self.guidance, self.guidance_rescale)

    def write(self, folder: Path, index: int, latents: torch.Tensor, iteration: int) -> Path:
        from ..inference.video_io import to_uint8_frames, write_json_atomic, write_mp4

        video = self.vae.decode(latents.to(next(self.vae.parameters()).device))
        path = write_mp4(folder / f"{index:06d}.mp4", to_uint8_frames(video[0].float().clamp(-1, 1).cpu()), self.fps)
        write_json_atomic(folder / f"{index:06d}.json", {
            "prompt": self.prompts[index], "iteration": iteration, "weights": "EMA", "seed": self.seed,
            "noise_seed": self.seed + index, "num_inference_steps": self.steps, "guidance_scale": self.guidance,
            "guidance_rescale": self.guidance_rescale, "size": list(self.size), "fps": self.fps, "video": path.name})
        return path

    def sample(self, ddp: nn.Module, optimizer, save: str, iteration: int) -> ValidationVideos:
        """All of this replica's prompts with the EMA weights (collective over every rank; every file is written
        when it returns)."""
        from ..checkpoint.layout import iteration_dir
        from ..models.wrappers import unwrap

        platform.synchronize()
        t0 = time.monotonic()
        folder = iteration_dir(Path(save) / "validation", iteration)
        writer = self.dims.tp_rank == 0 and self.dims.cp_rank == 0
        with preserved_rng(), ema_weights(ddp, optimizer), eval_mode(unwrap(ddp)):
            for index in self.mine():
                latents = self.latents(unwrap(ddp), index)
                if writer:
                    self.write(folder, index, latents, iteration)
        platform.synchronize()
        if dist.is_initialized():
            dist.barrier()
        return ValidationVideos(folder, time.monotonic() - t0)
