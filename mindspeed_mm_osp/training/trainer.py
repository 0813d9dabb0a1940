"""The pretraining loop (reference training.md §5), with its defects fixed.

Per iteration: zero grad buffers → GA micro-batches (encode, noise, forward, backward) →
`finalize_model_grads` (DP reduce, TP sum of `.sequence_parallel` params) → clip and
step (`optim.clip_and_step`: one all-reduced norm; non-finite or extreme norms skip the
update with weights, EMA, optimizer state and LR untouched) → LR step on success →
log → periodic atomic save. Data exhaustion ends training without a phantom iteration;
too many skips in a row save the last good state and stop with an error.
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import platform
from ..config import load_data_config, load_model_config
from ..diffusion import FlowMatchingScheduler
from ..parallel import initialize_distributed
from .arguments import parse_fault_spec
from .batches import EncodedStream
from .components import (FrozenEncoders, build_predictor, optimizer_settings, resolve_precision, wrap_ddp)
from .flops import peak_flops_per_second, predictor_training_flops
from .logging import IterationStats, MetricWriters, format_line, setup_logging
from .step import flow_matching_loss

logger = logging.getLogger("mindspeed_mm_osp.train")


RECENT_LOSSES = 10_000  # a run of 1e8 iterations must not keep every loss in memory


class TrainingStopped(RuntimeError):
    """Training stopped on purpose after saving (too many skipped steps)."""


@dataclass
class TrainResult:
    iteration: int
    consumed_train_samples: int
    losses: list[float]  # per iteration of this run, the last RECENT_LOSSES at most
    skipped_iterations: int
    stop_reason: str


def _inject(ddp, kind: str) -> None:
    value = float("nan") if kind == "nan" else float("inf")
    for p in ddp.module.parameters():
        if p.requires_grad and getattr(p, "main_grad", None) is not None:
            p.main_grad.view(-1)[0] = value
            return


def _dp_mean(value: torch.Tensor) -> float:
    from megatron.core import parallel_state as ps

    value = value.detach().float().reshape(1).clone()
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    return float(value) / ps.get_data_parallel_world_size()


def pretrain(args: argparse.Namespace) -> TrainResult:
    """Run training as configured by parsed, validated `args` (see `arguments.parse_args`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..data import build_train_dataloader
    from ..models.text import load_tokenizer
    from ..optim import AdaptiveGradClip, build_lr_scheduler, build_optimizer, clip_and_step

    initialize_distributed(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                           cp=args.context_parallel_size, seed=args.seed,
                           timeout_minutes=args.distributed_timeout_minutes,
                           data_parallel_random_init=args.data_parallel_random_init)
    rank = dist.get_rank()
    setup_logging(rank)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    logger.info("world %d = TP %d x DP %d; sequence parallel %s; %s; accelerator %s", dist.get_world_size(), tp, dp,
                args.sequence_parallel, "distributed optimizer" if args.use_distributed_optimizer else "optimizer",
                platform.accelerator())

    model_cfg = load_model_config(args.mm_model)
    data_cfg = load_data_config(args.mm_data)
    model_cfg.predictor.validate_parallel(tp, file=args.mm_model)
    precision = resolve_precision(model_cfg, args)

    with torch.random.fork_rng(devices=[]):
        # Building the encoders (random init before their weights load) must not move the RNG stream the
        # predictor is initialised from: the same seed gives the same predictor with or without the feature cache.
        encoders = FrozenEncoders(model_cfg, precision)
    predictor = build_predictor(model_cfg, args, precision)
    ddp = wrap_ddp(predictor, args)
    settings = optimizer_settings(args, precision)
    optimizer = build_optimizer(ddp, settings)
    scheduler = build_lr_scheduler(optimizer, settings)
    clipper = AdaptiveGradClip(clip_grad=args.clip_grad, ema_decay=args.clip_grad_ema_decay or 0.0,
                               max_consecutive_skips=args.max_consecutive_skips)
    diffusion = FlowMatchingScheduler(model_cfg.diffusion)

    iteration, consumed = 0, 0
    if args.load:
        loaded = load_checkpoint(args.load, ddp, optimizer, scheduler, clip=clipper, iteration=args.ckpt_step,
                                 no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
                                 finetune=args.finetune)
        if loaded is not None:
            iteration, consumed = loaded.iteration, loaded.consumed_train_samples
            logger.info("resumed from %s at iteration %d (%d samples consumed)", loaded.path, iteration, consumed)

    # -- data: TP peers share a loader unless encoder DP splits encoding across them
    dp_cfg = data_cfg.dataset_param
    need_text = not model_cfg.load_text_features
    tokenizer = load_tokenizer(dp_cfg.tokenizer_config) if need_text and dp_cfg.tokenizer_config else None
    tokenizer_2 = load_tokenizer(dp_cfg.tokenizer_config_2) if need_text and dp_cfg.tokenizer_config_2 else None
    if model_cfg.load_video_features or model_cfg.load_text_features:  # feature cache (issue 8)
        from ..features import build_cached_dataloader

        build_loader = functools.partial(build_cached_dataloader, model_config=model_cfg)
    else:
        build_loader = build_train_dataloader
    mbs, gbs, ga = args.micro_batch_size, args.global_batch_size, args.num_microbatches
    encoder_dp = model_cfg.enable_encoder_dp and tp > 1
    ordinal = consumed // (dp * mbs)  # micro-batches this replica has trained on
    if encoder_dp:
        world = dist.get_world_size()
        loader, stats = build_loader(
            data_cfg, tokenizer=tokenizer, tokenizer_2=tokenizer_2, dp_rank=rank, dp_size=world,
            micro_batch_size=mbs, global_batch_size=world * mbs, consumed_samples=(ordinal // tp) * world * mbs,
            seed=args.seed)
    else:
        loader, stats = build_loader(
            data_cfg, tokenizer=tokenizer, tokenizer_2=tokenizer_2, dp_rank=dp_rank, dp_size=dp,
            micro_batch_size=mbs, global_batch_size=gbs, consumed_samples=consumed, seed=args.seed)
    stream = EncodedStream(loader, encoders, seed=args.seed, start_ordinal=ordinal, dp_rank=dp_rank,
                           encoder_dp_size=tp if encoder_dp else 1, encoder_dp_rank=tp_rank if encoder_dp else 0,
                           tp_group=ps.get_tensor_model_parallel_group())

    writers = MetricWriters(args, is_logging_rank=rank == 0)
    faults = parse_fault_spec(args.inject_nonfinite_grad)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_per_second()
    start_time = time.monotonic()
    losses: collections.deque[float] = collections.deque(maxlen=RECENT_LOSSES)
    skipped = nan_iterations = 0
    stop_reason = "train_iters reached"
    last_saved = iteration

    def save(it: int) -> None:
        nonlocal last_saved
        if args.save and it != last_saved:
            save_checkpoint(args.save, it, ddp, optimizer, scheduler, clip=clipper, consumed_train_samples=consumed,
                            args=vars(args), save_optim=not args.no_save_optim, save_rng=not args.no_save_rng)
            last_saved = it

    ddp.train()
    try:
        while iteration < args.train_iters:
            t0 = time.monotonic()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            mb_losses, flops = [], 0.0
            try:
                for _ in range(ga):
                    enc = stream.next()
                    gen = stream.noise_generator(stream.ordinal - 1)
                    loss = flow_matching_loss(ddp, diffusion, enc, gen, precision.predictor)
                    (loss / ga).backward()
                    mb_losses.append(loss.detach())
                    _, _, t, h, w = enc.latents.shape
                    flops += predictor_training_flops(model_cfg.predictor, enc.latents.shape[0], (t, h, w),
                                                      enc.text.shape[1])
            except StopIteration:
                stop_reason = "data exhausted"
                logger.info("data exhausted after %d iterations (%d samples)", iteration, consumed)
                break
            finalize_model_grads([ddp])
            if iteration + 1 in faults:
                _inject(ddp, faults[iteration + 1])
                if rank == 0:
                    logger.warning("fault injection: %s gradient at iteration %d", faults[iteration + 1], iteration + 1)
            result = clip_and_step(optimizer, clipper)
            if result.update_successful:
                scheduler.step(1)
            else:
                skipped += 1
                if result.grad_norm is None or not math.isfinite(result.grad_norm):
                    nan_iterations += 1
                if rank == 0:
                    logger.warning("iteration %d skipped: %s (grad norm %s)", iteration + 1,
                                   result.decision.reason if result.decision else "non-finite gradients",
                                   result.grad_norm)
            iteration += 1
            consumed += gbs
            loss_value = _dp_mean(torch.stack(mb_losses).mean())
            losses.append(loss_value)
            elapsed = time.monotonic() - t0
            if iteration % args.log_interval == 0:
                per_device = flops * dp / dist.get_world_size() / elapsed if elapsed > 0 else 0.0
                stats_line = IterationStats(
                    iteration=iteration, train_iters=args.train_iters, consumed_samples=consumed,
                    elapsed_ms=1000 * elapsed, learning_rate=optimizer.param_groups[0]["lr"],
                    global_batch_size=gbs, loss=loss_value, grad_norm=result.grad_norm,
                    clip_threshold=(result.decision.threshold if result.decision and
                                    math.isfinite(result.decision.threshold) else None),
                    skipped_iterations=skipped, nan_iterations=nan_iterations,
                    samples_per_second=gbs / elapsed if elapsed > 0 else 0.0,
                    tflops_per_device=per_device / 1e12, mfu=per_device / peak if peak else None,
                    extra={"read failures": sum(stats.read_failures.values())} if stats.read_failures else {})
                if rank == 0:
                    logger.info(format_line(stats_line))
                writers.write(stats_line)
            if result.stop_training:
                save(iteration)
                raise TrainingStopped(
                    f"{result.consecutive_skips} consecutive iterations skipped for non-finite or extreme gradients "
                    f"(limit --max-consecutive-skips={args.max_consecutive_skips}); the last good state was saved at "
                    f"iteration {iteration} in {args.save}. Inspect the data and the learning rate, then resume.")
            if args.save_interval and iteration % args.save_interval == 0:
                save(iteration)
            if args.exit_interval and iteration % args.exit_interval == 0:
                stop_reason = "exit interval"
                break
            if args.exit_duration_in_mins and (time.monotonic() - start_time) / 60 > args.exit_duration_in_mins:
                stop_reason = "exit duration"
                break
        save(iteration)
    finally:
        writers.close()
    if stats.read_failures and rank == 0:
        logger.info("unreadable files skipped (retried on other samples): %s", dict(stats.read_failures))
    logger.info("training finished: %s at iteration %d", stop_reason, iteration)
    return TrainResult(iteration=iteration, consumed_train_samples=consumed, losses=list(losses),
                       skipped_iterations=skipped, stop_reason=stop_reason)
