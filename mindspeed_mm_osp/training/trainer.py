"""The pretraining loop (docs/training.md) as a `Trainer` with named phases.

`Trainer.fit` runs: `build` (process groups, configs, frozen encoders, predictor, DDP, `plan_iterations` (the
run's length from the data and `--train-epochs`), optimizer, `build_validation`) → `resume` (a checkpoint, when
`--load`) → `build_data` (this rank's loader shard) → `announce` → per iteration `train_step` → `log` → `validate`
(loss and EMA samples at their intervals) → `should_stop` (saving on `--save-interval`) → `save`. All that changes
while training lives in one `TrainState`; the stop and skip rules are shared with the autoencoder loop (`loop.py`).

Per iteration: zero grad buffers → GA micro-batches (encode, noise, forward, backward) →
`finalize_model_grads` (DP reduce, TP sum of `.sequence_parallel` params) → clip and step
(`optim.clip_and_step`: one all-reduced norm; non-finite or extreme norms skip the update with
weights, EMA, optimizer state and LR untouched) → LR step on success → log → periodic atomic
save. Data exhaustion ends training without a phantom iteration; too many skips in a row save
the last good state and stop with an error.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import torch
from torch import nn

from .. import platform
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..checkpoint.async_save import AsyncSaves
from ..checkpoint.reader import load_weights_shard
from ..checkpoint.weights import load_predictor_shard
from ..config import ConfigError, DataConfig, load_data_config, load_model_config, validate_conditioning
from ..diffusion import FlowMatchingScheduler
from ..models.lora import apply_lora, lora_metadata
from ..models.predictor import build_predictor
from ..optim import AdaptiveGradClip, OptimizerSettings, build_lr_scheduler, build_optimizer
from ..optim import clip_and_step
from ..parallel import initialize_distributed
from ..parallel.context_parallel import loss_scale_for_grads
from .args import TrainingArgs
from .arguments import parse_fault_spec
from .batches import DataPlan, build_train_stream, plan_train_data
from .components import FrozenEncoders, resolve_precision, wrap_ddp
from .flops import peak_flops_per_second, predictor_training_flops
from .logging import IterationStats, MetricWriters, format_line, setup_logging
from .loop import LoopRules, StepOutcome, TrainResult, TrainState, dp_mean
from .step import flow_matching_loss
from .validation import ValidationLoss, ValidationSampler, ValidationSet, validation_loss, validation_sigmas

logger = logging.getLogger("mindspeed_mm_osp.train")


class Trainer(LoopRules):
    """Training of the SparseUMMDiT as configured by validated `args` (see `arguments.parse_args`)."""

    def __init__(self, args: TrainingArgs):
        self.args = args
        self.state = TrainState()
        self.faults = parse_fault_spec(args.inject_nonfinite_grad)
        self.lora: Optional[dict] = None  # `models.lora.lora_metadata` of a LoRA run (set by build_model)
        self.async_saves = AsyncSaves() if args.async_save else None  # --async-save: the save in flight

    # -- build -------------------------------------------------------------------------------------------------

    def build(self) -> None:
        """Process groups, configs, frozen encoders, the DDP-wrapped predictor, optimizer, schedule and clip."""
        args = self.args
        self._init_distributed()
        self.model_cfg = load_model_config(args.mm_model)
        self.data_cfg = self.data_config()
        self.model_cfg.predictor.validate_parallel(self.tp, self.cp, file=args.mm_model)
        validate_conditioning(self.model_cfg, self.data_cfg, model_file=args.mm_model, data_file=args.mm_data,
                              loss_region=args.i2v_loss_region)
        self.precision = resolve_precision(self.model_cfg, args)
        with torch.random.fork_rng(devices=[]):
            # Building the encoders (random init before their weights load) must not move the RNG stream the
            # predictor is initialised from: the same seed gives the same predictor with or without the feature cache.
            self.encoders = FrozenEncoders(self.model_cfg, self.precision)
        self.ddp = wrap_ddp(self.build_model(), args)
        self.plan_iterations()
        args = self.args  # with the iteration count the data allows
        settings = OptimizerSettings.from_args(args, bf16=self.precision.predictor == torch.bfloat16)
        self.optimizer = build_optimizer(self.ddp, settings)
        self.scheduler = build_lr_scheduler(self.optimizer, settings)
        self.clipper = AdaptiveGradClip(clip_grad=args.clip_grad, ema_decay=args.clip_grad_ema_decay or 0.0,
                                        max_consecutive_skips=args.max_consecutive_skips)
        self.diffusion = FlowMatchingScheduler(self.model_cfg.diffusion)
        self.build_validation()

    def _init_distributed(self) -> None:
        args = self.args
        self.dims = initialize_distributed(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                                           cp=args.context_parallel_size, seed=args.seed,
                                           timeout_minutes=args.distributed_timeout_minutes,
                                           data_parallel_random_init=args.data_parallel_random_init)
        self.rank, self.world_size = self.dims.rank, self.dims.world_size
        setup_logging(self.rank)
        self.tp, self.dp, self.cp = self.dims.tp, self.dims.dp, self.dims.cp
        logger.info("world %d = TP %d x CP %d x DP %d; sequence parallel %s; %s; accelerator %s", self.world_size,
                    self.tp, self.cp, self.dp, args.sequence_parallel,
                    "distributed optimizer" if args.use_distributed_optimizer else "optimizer", platform.accelerator())

    def plan_iterations(self) -> None:
        """Read the annotations once and fix the run's length: `--train-iters` (or `--train-samples`), at most what
        `--train-epochs` passes over the data give (one pass by default; a warning says when that cuts the run),
        or exactly those passes when no length is given."""
        args = self.args
        epochs = args.train_epochs or 1
        self.data_plan: DataPlan = plan_train_data(
            self.data_cfg, self.model_cfg, self.dims, micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size, num_microbatches=args.num_microbatches, epochs=epochs,
            seed=args.seed)
        allowed = self.data_plan.iterations
        if args.train_iters is not None and args.train_iters > allowed and self.rank == 0:
            logger.warning("--train-iters %d is more than the data allows: %d samples give %d iterations per epoch "
                           "at global batch %d, x %d epoch(s) = %d iterations; training for %d. To train longer, "
                           "repeat the data with --train-epochs %d", args.train_iters, self.data_plan.samples,
                           self.data_plan.iterations_per_epoch, args.global_batch_size, epochs, allowed, allowed,
                           -(-args.train_iters // max(self.data_plan.iterations_per_epoch, 1)))
        iters = allowed if args.train_iters is None else min(args.train_iters, allowed)
        self.args = dataclasses.replace(args, train_iters=iters)

    def build_validation(self) -> None:
        """The validation set (`--mm-valid-data`) and prompts (`--validation-prompts`), when asked for; building
        them draws from no generator training uses."""
        from .validation import preserved_rng

        args = self.args
        if args.eval_interval and not args.mm_valid_data and self.rank == 0:
            logger.info("--eval-interval %d: no validation loss without a validation set (--mm-valid-data FILE)",
                        args.eval_interval)
        self.valid_set: Optional[ValidationSet] = None
        self.valid_sampler: Optional[ValidationSampler] = None
        with preserved_rng():
            if args.mm_valid_data:
                limit = args.eval_iters * args.global_batch_size if args.eval_iters else None
                self.valid_set = ValidationSet(load_data_config(args.mm_valid_data), args.mm_model, self.encoders,
                                               self.dims, seed=args.seed, limit=limit)
            if args.validation_prompts:
                self.valid_sampler = ValidationSampler(args, self.model_cfg, self.data_cfg, self.encoders, self.dims)

    def data_config(self) -> DataConfig:
        """The data JSON of `--mm-data`, as this objective reads it."""
        return load_data_config(self.args.mm_data)

    def build_model(self) -> nn.Module:
        """The predictor on this rank's device, with `predictor.from_pretrained` (merged weights) when set.

        With `--lora-r`: the base weights come from `--load` (or `predictor.from_pretrained`), are frozen, and
        LoRA adapters are added (`models.lora.apply_lora`) before DDP sees the model, so megatron's DDP and
        optimizer hold (and the EMA and checkpoints cover) the adapters only.
        """
        cfg, lora = self.model_cfg.predictor, self.args.lora_config()
        source = (self.args.load or cfg.from_pretrained) if lora else cfg.from_pretrained
        key = "--load" if lora and self.args.load else "predictor.from_pretrained"
        if lora and not source:
            raise ConfigError(self.args.mm_model, key, "LoRA fine-tuning needs base weights: pass --load (released "
                              "model_ema.pt, merged weights or a full-model checkpoint folder) or set it")
        try:  # a LoRA base may also be a training checkpoint folder; each rank reads only its TP shard
            read = load_predictor_shard if lora else load_weights_shard
            state = read(source, self.dims.tp_rank, self.tp, self.args.verify_checkpoint) if source else None
        except CheckpointError as exc:
            raise ConfigError(self.args.mm_model, key, str(exc)) from exc
        model = build_predictor(cfg, state, self.precision.predictor, platform.device(), self.args.sequence_parallel,
                                recompute=self.args.recompute_config(), train=True, dims=self.dims, tp_local=True)
        if state is not None:
            logger.info("predictor weights loaded from %s", source)
        if lora:
            layers = apply_lora(model, lora)
            self.lora = lora_metadata(lora, model.predictor_config)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info("LoRA r=%d alpha=%s on %d layers: %d trainable of %d parameters", lora.r, lora.alpha or lora.r,
                        len(layers), trainable, sum(p.numel() for p in model.parameters()))
        return model

    # -- resume and data ---------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Model, optimizer, schedule, clip and RNG state from `--load` (nothing when it holds no checkpoint);
        for LoRA, the adapters and their training state from `--lora-load` (`--load` is the base)."""
        args = self.args
        path = args.lora_load if self.lora else args.load
        if not path:
            return
        loaded = load_checkpoint(path, self.ddp, self.optimizer, self.scheduler, clip=self.clipper,
                                 iteration=args.ckpt_step, no_load_optim=args.no_load_optim,
                                 no_load_rng=args.no_load_rng, finetune=args.finetune, lora=self.lora, dims=self.dims,
                                 verify=args.verify_checkpoint)
        if loaded is not None:
            self.state.iteration = self.state.last_saved = loaded.iteration
            self.state.consumed_samples = loaded.consumed_train_samples
            logger.info("resumed from %s at iteration %d (%d samples consumed)", loaded.path, loaded.iteration,
                        loaded.consumed_train_samples)

    def build_data(self) -> None:
        """This rank's encoded micro-batch stream, positioned after the samples already consumed."""
        args = self.args
        self.stream, self.data_stats = build_train_stream(
            self.data_plan, self.data_cfg, self.model_cfg, self.encoders, self.dims,
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            consumed_samples=self.state.consumed_samples, seed=args.seed)

    def announce(self) -> None:
        """One line (rank 0) with the iterations this run trains, which `_train_loop` then runs."""
        plan, args, start = self.data_plan, self.args, self.state.iteration
        if self.rank == 0:
            logger.info("training for %d iterations (%d samples x %d epoch(s) = %d iterations at global batch %d)%s",
                        args.train_iters, plan.samples, plan.epochs, plan.iterations, args.global_batch_size,
                        f", from iteration {start}" if start else "")

    # -- one iteration -----------------------------------------------------------------------------------------

    def train_step(self) -> StepOutcome:
        """Gradient accumulation over the micro-batches, grad reduce, clip and step. StopIteration: no data left."""
        t0 = time.monotonic()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses, flops = self._accumulate_gradients()
        self._finalize_gradients()
        result = clip_and_step(self.optimizer, self.clipper)
        if result.update_successful:
            self.scheduler.step(1)
        else:
            self._count_skip(result)
        self.state.iteration += 1
        self.state.consumed_samples += self.args.global_batch_size
        loss = dp_mean(torch.stack(losses).mean(), self.dims)
        self.state.losses.append(loss)
        return StepOutcome(loss=loss, clip=result, flops=flops, elapsed_s=time.monotonic() - t0)

    def _accumulate_gradients(self) -> tuple[list[torch.Tensor], float]:
        ga = self.args.num_microbatches
        # DDP averages over DP x CP; CP ranks' grads are shares of one micro-batch's (context_parallel.py)
        scale = loss_scale_for_grads() / ga
        losses, flops = [], 0.0
        for _ in range(ga):
            enc = self.stream.next()
            loss = self.micro_batch_loss(enc, self.stream.noise_generator(self.stream.ordinal - 1))
            (loss * scale).backward()
            losses.append(loss.detach())
            _, _, t, h, w = enc.latents.shape
            flops += predictor_training_flops(self.model_cfg.predictor, enc.latents.shape[0], (t, h, w),
                                              enc.text.shape[1])
        return losses, flops

    def micro_batch_loss(self, enc, generator: torch.Generator) -> torch.Tensor:
        """The fp32 scalar loss of one micro-batch, its noise drawn from `generator` (a subclass's objective,
        e.g. `distill.DistillTrainer`, overrides this alone)."""
        return flow_matching_loss(self.ddp, self.diffusion, enc, generator, self.precision.predictor,
                                  self.args.i2v_loss_region)

    def log(self, step: StepOutcome) -> None:
        """The Megatron iteration line (rank 0) and the metric writers, every `--log-interval` iterations."""
        args, state = self.args, self.state
        if state.iteration % args.log_interval != 0:
            return
        stats = IterationStats.from_step(
            iteration=state.iteration, train_iters=args.train_iters, consumed_samples=state.consumed_samples,
            global_batch_size=args.global_batch_size, learning_rate=self.optimizer.param_groups[0]["lr"],
            loss=step.loss, clip=step.clip, elapsed_s=step.elapsed_s, flops=step.flops,
            data_parallel_size=self.dp, world_size=self.world_size, peak_flops=self.peak_flops,
            skipped_iterations=state.skipped_iterations, nan_iterations=state.nan_iterations,
            read_failures=self.data_stats.read_failures)
        if self.rank == 0:
            logger.info(format_line(stats))
        self.writers.write(stats)

    # -- validation ------------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """The validation loss every `--eval-interval` and EMA samples every `--validation-interval` iterations
        (collective); both change nothing training computes, and the time they take is logged."""
        from ..models.wrappers import unwrap

        args, it = self.args, self.state.iteration
        if self.valid_set is not None and it % args.eval_interval == 0:
            result: ValidationLoss = validation_loss(
                unwrap(self.ddp), self.diffusion, self.valid_set, self.dims, sigmas=validation_sigmas(args.eval_sigmas),
                dtype=self.precision.predictor, loss_region=args.i2v_loss_region)
            self.state.validation[it] = result.loss
            if self.rank == 0:
                logger.info(result.line(it))
            self.writers.write_scalars({**result.scalars(), "validation/seconds": result.elapsed_s}, it)
        if self.valid_sampler is not None and it % args.validation_interval == 0:
            videos = self.valid_sampler.sample(self.ddp, self.optimizer, args.save, it)
            if self.rank == 0:
                logger.info(videos.line(it, len(self.valid_sampler.prompts)))
            self.writers.write_videos(videos.paths(), it)
            self.writers.write_scalars({"validation/sample-seconds": videos.elapsed_s}, it)

    # -- stop and save -----------------------------------------------------------------------------------------

    def save(self, wait: bool = False) -> None:
        """Checkpoint the current iteration to `--save` (collective; once per iteration). `wait`: return only
        once it is published, also with --async-save (the end of training and every stop)."""
        args, state = self.args, self.state
        if args.save and state.iteration != state.last_saved:
            save_checkpoint(args.save, state.iteration, self.ddp, self.optimizer, self.scheduler, clip=self.clipper,
                            consumed_train_samples=state.consumed_samples, args=args.to_dict(),
                            save_optim=not args.no_save_optim, save_rng=not args.no_save_rng, lora=self.lora,
                            dims=self.dims, async_saves=self.async_saves, ckpt_format=args.ckpt_format)
            state.last_saved = state.iteration
        if wait and self.async_saves is not None:
            self.async_saves.wait()

    # -- the run -----------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """All phases: build, resume, data, iterate until a stop rule, save."""
        self.build()
        self.resume()
        self.build_data()
        self.announce()
        self._train_loop()
        state, read_failures = self.state, self.data_stats.read_failures
        if read_failures and self.rank == 0:
            logger.info("unreadable files skipped (retried on other samples): %s", dict(read_failures))
        logger.info("training finished: %s at iteration %d", state.stop_reason, state.iteration)
        return TrainResult(iteration=state.iteration, consumed_train_samples=state.consumed_samples,
                           losses=list(state.losses), skipped_iterations=state.skipped_iterations,
                           stop_reason=state.stop_reason, validation=dict(state.validation))

    def _train_loop(self) -> None:
        args, state = self.args, self.state
        self.writers = MetricWriters(args, is_logging_rank=self.rank == 0)
        self.peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_per_second()
        self.start_time = time.monotonic()
        self.ddp.train()
        try:
            while state.iteration < args.train_iters:
                try:
                    step = self.train_step()
                except StopIteration:
                    state.stop_reason = "data exhausted"
                    logger.info("data exhausted after %d iterations (%d samples)", state.iteration,
                                state.consumed_samples)
                    break
                self.log(step)
                self.validate()
                reason = self.should_stop(step)
                if reason is not None:
                    state.stop_reason = reason
                    break
            self.save(wait=True)
        finally:
            self.writers.close()


def pretrain(args: TrainingArgs) -> TrainResult:
    """Run training as configured by parsed, validated `args` (see `arguments.parse_args`)."""
    return Trainer(args).fit()
