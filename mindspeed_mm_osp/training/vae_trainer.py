"""WF-VAE training (docs/vae_training.md): `pretrain.py` with a model JSON whose top level says
`"train_autoencoder": true`.

The same phases and reliability rules as the predictor's `Trainer`: `build` (data-parallel groups, the WF-VAE
in megatron-core DDP, `FusedEmaAdamW` with its EMA, LR schedule, adaptive clip; the discriminator only when its
start step falls inside the run) → `resume` → `build_data` → per iteration `train_step` → `log` →
`should_stop` (saving on `--save-interval`) → `save`. Each iteration steps the autoencoder on the generator
loss, then (from `loss.discriminator_start` on) the discriminator on the hinge loss; a non-finite or extreme
gradient norm skips that update (`optim.clip_and_step`). Checkpoints are the predictor's atomic legacy layout
(discriminator in `<save>/discriminator`, written first; the autoencoder's tracker last), and every save also
exports the EMA in the release layout to `<save>/merged.ckpt`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import platform
from ..checkpoint import load_checkpoint, save_checkpoint
from ..checkpoint.layout import iteration_dir
from ..config import load_data_config
from ..config.loader import ConfigError
from ..config.vae_training import VAETrainingConfig, load_vae_training_config
from ..errors import UserError
from ..models.ae.checkpoint import load_wfvae_checkpoint, save_released_checkpoint
from ..models.ae.discriminator import PatchDiscriminator3D
from ..models.ae.inflate import inflate_from_checkpoint
from ..models.ae.losses import generator_loss, hinge_discriminator_loss
from ..models.ae.perceptual import PerceptualLoss
from ..models.ae.wfvae import WFVAE
from ..optim import AdaptiveGradClip, OptimizerSettings, build_lr_scheduler, build_optimizer, clip_and_step
from ..optim import ema_state_dict
from ..parallel import initialize_distributed
from ..parallel.transformer_config import make_transformer_config
from .args import TrainingArgs
from .components import wrap_ddp
from .logging import setup_logging
from .arguments import parse_fault_spec
from .loop import LoopRules, StepOutcome, TrainResult, TrainState, dp_mean
from .vae_data import build_clip_loader, posterior_noise

logger = logging.getLogger("mindspeed_mm_osp.train")

DISCRIMINATOR_DIR = "discriminator"
RELEASED_FILE = "merged.ckpt"


def check_vae_parallel(args: TrainingArgs) -> None:
    """The autoencoder is small: data parallelism only; the run's length is counted in iterations."""
    sizes = {"--tensor-model-parallel-size": args.tensor_model_parallel_size,
             "--context-parallel-size": args.context_parallel_size,
             "--pipeline-model-parallel-size": args.pipeline_model_parallel_size}
    wrong = [f"{flag} {size}" for flag, size in sizes.items() if size != 1]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: WF-VAE training is data-parallel only; set it to 1 (every rank "
                        "holds the whole autoencoder)")
    if args.train_iters is None:
        raise UserError("--train-epochs: WF-VAE training cycles over the data until --train-iters (or "
                        "--train-samples); pass one of those instead")
    if args.lora_r is not None:
        raise UserError("--lora-r: LoRA applies to the predictor, not to WF-VAE training; drop the --lora-* flags")


def check_vae_config(args: TrainingArgs) -> None:
    """Before anything is built: the parallel layout, both JSON files and the files they name."""
    check_vae_parallel(args)
    cfg = load_vae_training_config(args.mm_model)
    cfg.check_paths(args.mm_model)
    load_data_config(args.mm_data).check_paths(args.mm_data, tokenizers=False)


def build_wfvae(cfg: VAETrainingConfig, file: str) -> WFVAE:
    """The trainable WF-VAE (fp32): random init, then `ae.from_pretrained` or the inflated `inflate_from`."""
    if cfg.ae.dtype != "fp32":
        raise ConfigError(file, "ae.dtype", f"WF-VAE training keeps fp32 weights, got {cfg.ae.dtype!r}; set \"fp32\"")
    model = WFVAE(cfg.ae)
    if cfg.ae.from_pretrained:
        load_wfvae_checkpoint(model, cfg.ae.from_pretrained)
    elif cfg.inflate_from:
        inflate_from_checkpoint(model, cfg.inflate_from, cfg.inflate_mode)
    return model


def _with_ddp_config(module: nn.Module) -> nn.Module:
    """megatron-core DDP and `finalize_model_grads` read a TransformerConfig from the module (TP = 1 here)."""
    module.config = make_transformer_config(num_heads=1, hidden_size=1, tp=1)
    return module


class GAN:
    """The discriminator's DDP module, optimizer (no EMA), LR schedule and clip."""

    def __init__(self, cfg: VAETrainingConfig, args: TrainingArgs, settings: OptimizerSettings):
        loss = cfg.loss
        disc = PatchDiscriminator3D(loss.discriminator_channels, loss.discriminator_layers).to(platform.device())
        self.ddp = wrap_ddp(_with_ddp_config(disc), args)
        lr = loss.discriminator_lr or settings.lr
        warm = args.lr_warmup_iters or args.lr_warmup_fraction
        disc = dataclasses.replace(settings, lr=lr, min_lr=min(settings.min_lr, lr), ema_decay=0.0,
                                   lr_warmup_init=min(settings.lr_warmup_init, lr) if warm else lr)
        self.optimizer = build_optimizer(self.ddp, disc)
        self.scheduler = build_lr_scheduler(self.optimizer, disc)
        self.clipper = AdaptiveGradClip(clip_grad=args.clip_grad, ema_decay=args.clip_grad_ema_decay or 0.0,
                                        max_consecutive_skips=args.max_consecutive_skips)

    def step(self, videos: list[torch.Tensor], recons: list[torch.Tensor]) -> float:
        """One discriminator update on real clips and (detached) reconstructions; returns the local hinge loss."""
        from megatron.core.distributed import finalize_model_grads

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = []
        for video, recon in zip(videos, recons):
            loss = hinge_discriminator_loss(self.ddp(video), self.ddp(recon))
            (loss / len(videos)).backward()
            losses.append(float(loss))
        finalize_model_grads([self.ddp])
        if clip_and_step(self.optimizer, self.clipper).update_successful:
            self.scheduler.step(1)
        return sum(losses) / len(losses)


class VAETrainer(LoopRules):
    """WF-VAE training as configured by validated `args` (the predictor `Trainer`'s phases and stop rules)."""

    def __init__(self, args: TrainingArgs):
        self.args = args
        self.state = TrainState()
        self.faults = parse_fault_spec(args.inject_nonfinite_grad)
        self.async_saves = None  # the autoencoder's checkpoints are small: always written in the loop
        self.last_parts: dict = {}
        self.last_disc_loss: Optional[float] = None

    def build(self) -> None:
        args = self.args
        check_vae_parallel(args)
        self.dims = initialize_distributed(seed=args.seed, timeout_minutes=args.distributed_timeout_minutes)
        self.rank = self.dims.rank
        setup_logging(self.rank)
        logger.info("WF-VAE training: data parallel over %d ranks", self.dims.dp)
        self.cfg = load_vae_training_config(args.mm_model)
        self.data_cfg = load_data_config(args.mm_data)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # the same init on every DP rank
            self.vae = build_wfvae(self.cfg, args.mm_model).to(platform.device())
            self.ddp = wrap_ddp(_with_ddp_config(self.vae), args)
            settings = OptimizerSettings.from_args(args, bf16=False)
            self.optimizer = build_optimizer(self.ddp, settings)
            self.scheduler = build_lr_scheduler(self.optimizer, settings)
            self.gan = GAN(self.cfg, args, settings) if self._gan_in_run() else None
        self.clipper = AdaptiveGradClip(clip_grad=args.clip_grad, ema_decay=args.clip_grad_ema_decay or 0.0,
                                        max_consecutive_skips=args.max_consecutive_skips)
        self.perceptual = self._perceptual()

    def _gan_in_run(self) -> bool:
        loss = self.cfg.loss
        active = loss.discriminator_weight > 0 and loss.discriminator_start < self.args.train_iters
        if loss.discriminator_weight > 0 and not active:
            logger.info("discriminator off: loss.discriminator_start %d is not before --train-iters %d",
                        loss.discriminator_start, self.args.train_iters)
        return active

    def _perceptual(self) -> Optional[PerceptualLoss]:
        loss = self.cfg.loss
        if loss.perceptual_weight > 0 and loss.perceptual_weights_path:
            logger.info("perceptual loss on, backbone weights from %s", loss.perceptual_weights_path)
            return PerceptualLoss(loss.perceptual_weights_path).to(platform.device())
        if loss.perceptual_weight > 0:
            logger.info("perceptual loss off: loss.perceptual_weights_path is not set (it needs a local backbone "
                        "weights file, docs/vae_training.md)")
        return None

    def resume(self) -> None:
        args = self.args
        if not args.load:
            return
        loaded = load_checkpoint(args.load, self.ddp, self.optimizer, self.scheduler, clip=self.clipper,
                                 iteration=args.ckpt_step, no_load_optim=args.no_load_optim,
                                 no_load_rng=args.no_load_rng, finetune=args.finetune, dims=self.dims,
                                 verify=args.verify_checkpoint)
        if loaded is None:
            return
        self.state.iteration = self.state.last_saved = loaded.iteration
        self.state.consumed_samples = loaded.consumed_train_samples
        logger.info("resumed from %s at iteration %d (%d samples consumed)", loaded.path, loaded.iteration,
                    loaded.consumed_train_samples)
        gan_dir = Path(args.load) / DISCRIMINATOR_DIR
        if self.gan is not None and not args.finetune and iteration_dir(gan_dir, loaded.iteration).is_dir():
            load_checkpoint(gan_dir, self.gan.ddp, self.gan.optimizer, self.gan.scheduler, clip=self.gan.clipper,
                            iteration=loaded.iteration, no_load_optim=args.no_load_optim, no_load_rng=True,
                            dims=self.dims, verify=args.verify_checkpoint)
        elif self.gan is not None:
            logger.info("no discriminator state for iteration %d in %s: the discriminator starts fresh",
                        loaded.iteration, gan_dir)

    def build_data(self) -> None:
        args = self.args
        loader, self.data_stats = build_clip_loader(
            self.data_cfg, self.dims, micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            consumed_samples=self.state.consumed_samples, seed=args.seed, train_iters=args.train_iters)
        self.loader_iter = iter(loader)

    def train_step(self) -> StepOutcome:
        """Generator micro-batches, grad reduce, clip and step; then the discriminator. StopIteration: no data."""
        t0 = time.monotonic()
        videos = [next(self.loader_iter).video.to(platform.device()) for _ in range(self.args.num_microbatches)]
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        gan = self.gan if self.gan is not None and self.state.iteration >= self.cfg.loss.discriminator_start else None
        losses, recons = [], []
        for m, video in enumerate(videos):
            loss, recon = self._generator_micro_step(video, m, gan)
            losses.append(loss)
            recons.append(recon)
        self._finalize_gradients()
        result = clip_and_step(self.optimizer, self.clipper)
        if result.update_successful:
            self.scheduler.step(1)
        else:
            self._count_skip(result)
        self.last_disc_loss = gan.step(videos, recons) if gan is not None else None
        self.state.iteration += 1
        self.state.consumed_samples += self.args.global_batch_size
        loss = dp_mean(torch.stack(losses).mean(), self.dims)
        self.state.losses.append(loss)
        return StepOutcome(loss=loss, clip=result, flops=0.0, elapsed_s=time.monotonic() - t0)

    def _generator_micro_step(self, video: torch.Tensor, micro: int, gan: Optional[GAN]):
        args, dims = self.args, self.dims
        first = self.state.consumed_samples + (micro * dims.dp + dims.dp_rank) * args.micro_batch_size
        z, t, h, w = self.cfg.ae.latent_dim, (video.shape[2] - 1) // 8 + 1, video.shape[3] // 8, video.shape[4] // 8
        noise = posterior_noise((video.shape[0], z, t, h, w), seed=args.seed, first_sample=first)
        out = self.ddp(video, noise.to(video.device))
        loss = generator_loss(self.cfg.loss, video, out, perceptual=self.perceptual,
                              discriminator=gan.ddp if gan is not None else None,
                              last_layer=self.vae.decoder.conv_out.weight)
        (loss.total / args.num_microbatches).backward()
        self.last_parts = loss.parts
        return loss.total.detach(), out.reconstruction.detach()

    def log(self, step: StepOutcome) -> None:
        args, state = self.args, self.state
        if state.iteration % args.log_interval != 0 or self.rank != 0:
            return
        parts = " | ".join(f"{k} {float(v):.4g}" for k, v in self.last_parts.items())
        disc = f" | disc loss {self.last_disc_loss:.4g}" if self.last_disc_loss is not None else ""
        norm = "nan" if step.clip.grad_norm is None else f"{step.clip.grad_norm:.4g}"
        logger.info("iteration %d/%d | consumed samples %d | lr %.4g | loss %.6g | %s%s | grad norm %s | "
                    "skipped %d | %.0f ms", state.iteration, args.train_iters, state.consumed_samples,
                    self.optimizer.param_groups[0]["lr"], step.loss, parts, disc, norm, state.skipped_iterations,
                    1000 * step.elapsed_s)

    def save(self, wait: bool = False) -> None:
        """Discriminator, then the autoencoder (tracker last), then the release-layout EMA export; collective."""
        args, state = self.args, self.state
        if not args.save or state.iteration == state.last_saved:
            return
        if self.gan is not None:
            save_checkpoint(Path(args.save) / DISCRIMINATOR_DIR, state.iteration, self.gan.ddp, self.gan.optimizer,
                            self.gan.scheduler, clip=self.gan.clipper, consumed_train_samples=state.consumed_samples,
                            save_optim=not args.no_save_optim, save_rng=False, dims=self.dims)
        save_checkpoint(args.save, state.iteration, self.ddp, self.optimizer, self.scheduler, clip=self.clipper,
                        consumed_train_samples=state.consumed_samples, args=args.to_dict(),
                        save_optim=not args.no_save_optim, save_rng=not args.no_save_rng, dims=self.dims)
        state.last_saved = state.iteration
        ema = ema_state_dict(self.ddp, self.optimizer)  # collective
        if self.rank == 0:
            save_released_checkpoint(Path(args.save) / RELEASED_FILE, self.vae.state_dict(), ema, state.iteration)
            logger.info("EMA weights (release layout) written to %s", Path(args.save) / RELEASED_FILE)
        if dist.is_initialized():
            dist.barrier()

    def fit(self) -> TrainResult:
        """All phases: build, resume, data, iterate until a stop rule, save."""
        self.build()
        self.resume()
        self.build_data()
        state, args = self.state, self.args
        self.start_time = time.monotonic()
        self.ddp.train()
        while state.iteration < args.train_iters:
            try:
                step = self.train_step()
            except StopIteration:
                state.stop_reason = "data exhausted"
                break
            self.log(step)
            reason = self.should_stop(step)
            if reason is not None:
                state.stop_reason = reason
                break
        self.save()
        logger.info("training finished: %s at iteration %d", state.stop_reason, state.iteration)
        return TrainResult(iteration=state.iteration, consumed_train_samples=state.consumed_samples,
                           losses=list(state.losses), skipped_iterations=state.skipped_iterations,
                           stop_reason=state.stop_reason)


def pretrain_vae(args: TrainingArgs) -> TrainResult:
    """Train the WF-VAE as configured by parsed, validated `args`."""
    return VAETrainer(args).fit()


__all__ = ["DISCRIMINATOR_DIR", "GAN", "RELEASED_FILE", "VAETrainer", "build_wfvae", "check_vae_config",
           "check_vae_parallel", "pretrain_vae"]
