"""Encoded micro-batches for one model replica, with optional encoder data parallelism.

Without `enable_encoder_dp` every TP and CP peer reads the same micro-batch (the loader
is sharded by DP rank, which excludes CP) and encodes it redundantly. With it (and TP > 1)
the loader is sharded by TP x DP rank, each TP peer encodes a *different* micro-batch
(its CP peers the same one), and the encoded
tensors are all-gathered inside the TP group: one fetch round feeds TP consecutive
micro-batches of the replica, cutting encoder work by TP.

Position is the replica's micro-batch ordinal, so resume is exact: the loader restarts at
the round holding that ordinal and the already-trained entries of the round are skipped.

DP invariance: the sampler deals micro-step m of a global batch to DP ranks in order, so replica micro-batch
ordinal o of DP rank r holds the samples a DP=1 run trains as micro-batch o * dp + r (same global and
micro-batch size). The VAE posterior draw and the flow-matching sigma/noise are keyed by that global
micro-batch index, never by the DP rank, so a global batch trains to the same losses and gradients split
as DP=1 with gradient accumulation or as DP=2 with half the accumulation (up to reduction order).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..config import DataConfig, ModelConfig
from ..data.batch import Batch
from ..parallel import ParallelDims
from .step import EncodedBatch, encode_batch, keyed_generator


@dataclass(frozen=True)
class LoaderShard:
    """Which slice of the data this rank loads, and where a resumed run restarts in it.

    Plain DP: the loader is sharded by DP rank (TP and CP peers load the same micro-batches) and resumes at
    `consumed_samples`. Encoder DP: sharded by `rank` of `world_size` (TP x DP, the world without CP) with a
    "global batch" of one micro-batch per such rank,
    resuming at the fetch round that holds the replica's next micro-batch ordinal.
    """

    dp_rank: int
    dp_size: int
    global_batch_size: int
    consumed_samples: int
    start_ordinal: int          # micro-batches this replica has trained on
    encoder_dp_size: int = 1
    encoder_dp_rank: int = 0

    @classmethod
    def plan(cls, *, rank: int, world_size: int, dp_rank: int, dp_size: int, tp_rank: int, tp_size: int,
             encoder_dp: bool, micro_batch_size: int, global_batch_size: int,
             consumed_samples: int) -> "LoaderShard":
        ordinal = consumed_samples // (dp_size * micro_batch_size)
        if encoder_dp and tp_size > 1:
            return cls(dp_rank=rank, dp_size=world_size, global_batch_size=world_size * micro_batch_size,
                       consumed_samples=(ordinal // tp_size) * world_size * micro_batch_size, start_ordinal=ordinal,
                       encoder_dp_size=tp_size, encoder_dp_rank=tp_rank)
        return cls(dp_rank=dp_rank, dp_size=dp_size, global_batch_size=global_batch_size,
                   consumed_samples=consumed_samples, start_ordinal=ordinal)


@dataclass(frozen=True)
class DataPlan:
    """The training index of this run and how many optimizer steps it gives: `micro_batches_per_epoch` of this
    replica over `epochs` passes, `num_microbatches` per step (the stream runs on across epoch boundaries)."""

    index: tuple  # (SampleIndex, FilterStats), handed to the loader so the annotations are read once
    samples: int
    micro_batches_per_epoch: int
    num_microbatches: int
    epochs: int

    @property
    def iterations_per_epoch(self) -> int:
        return self.micro_batches_per_epoch // self.num_microbatches

    @property
    def iterations(self) -> int:
        return self.epochs * self.micro_batches_per_epoch // self.num_microbatches


def _shard(model_cfg: ModelConfig, dims: ParallelDims, *, micro_batch_size: int, global_batch_size: int,
           consumed_samples: int) -> LoaderShard:
    """Encoder DP shards over the TP x DP ranks, TP-major so a rank's loader chunk is the global micro-batch it
    encodes; CP peers load and encode what their TP peer position does."""
    dp_rank, dp_size, tp_rank, tp_size = dims.dp_rank, dims.dp, dims.tp_rank, dims.tp  # DP excludes CP
    return LoaderShard.plan(
        rank=tp_rank * dp_size + dp_rank, world_size=dp_size * tp_size, dp_rank=dp_rank,
        dp_size=dp_size, tp_rank=tp_rank, tp_size=tp_size, encoder_dp=model_cfg.enable_encoder_dp,
        micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, consumed_samples=consumed_samples)


def plan_train_data(data_cfg: DataConfig, model_cfg: ModelConfig, dims: ParallelDims, *, micro_batch_size: int,
                    global_batch_size: int, num_microbatches: int, epochs: int, seed: int) -> DataPlan:
    """Read and filter the annotations once, and count the optimizer steps `epochs` passes over them give."""
    from ..data.loader import build_index_from_config
    from ..data.sampler import LengthGroupedSampler

    index = build_index_from_config(data_cfg, global_batch_size=global_batch_size)
    shard = _shard(model_cfg, dims, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                   consumed_samples=0)
    sampler = LengthGroupedSampler(index[0].shape_id, micro_batch_size=micro_batch_size,
                                   global_batch_size=shard.global_batch_size, dp_rank=shard.dp_rank,
                                   dp_size=shard.dp_size, seed=seed)
    return DataPlan(index=index, samples=len(index[0]), num_microbatches=num_microbatches, epochs=epochs,
                    micro_batches_per_epoch=sampler.micro_steps_per_epoch * shard.encoder_dp_size)


def build_train_stream(plan: DataPlan, data_cfg: DataConfig, model_cfg: ModelConfig, encoders, dims: ParallelDims, *,
                       micro_batch_size: int, global_batch_size: int, consumed_samples: int, seed: int):
    """(EncodedStream, DatasetStats) of this rank over `plan`'s index and epochs: online loader or feature cache,
    sharded by `LoaderShard`, positioned after `consumed_samples` (in whichever epoch that falls)."""
    from ..data import build_train_dataloader
    from ..models.text import load_tokenizer

    dp_cfg = data_cfg.dataset_param
    need_text = not model_cfg.load_text_features
    tokenizer = load_tokenizer(dp_cfg.tokenizer_config) if need_text and dp_cfg.tokenizer_config else None
    tokenizer_2 = load_tokenizer(dp_cfg.tokenizer_config_2) if need_text and dp_cfg.tokenizer_config_2 else None
    if model_cfg.load_video_features or model_cfg.load_text_features:  # feature cache (issue 8)
        from ..features import build_cached_dataloader

        build_loader = functools.partial(build_cached_dataloader, model_config=model_cfg)
    else:
        build_loader = build_train_dataloader
    shard = _shard(model_cfg, dims, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                   consumed_samples=consumed_samples)
    loader, stats = build_loader(
        data_cfg, tokenizer=tokenizer, tokenizer_2=tokenizer_2, dp_rank=shard.dp_rank, dp_size=shard.dp_size,
        micro_batch_size=micro_batch_size, global_batch_size=shard.global_batch_size,
        consumed_samples=shard.consumed_samples, seed=seed, num_epochs=plan.epochs, index=plan.index)
    stream = EncodedStream(loader, encoders, seed=seed, start_ordinal=shard.start_ordinal, dp_rank=dims.dp_rank,
                           dp_size=dims.dp, encoder_dp_size=shard.encoder_dp_size, encoder_dp_rank=shard.encoder_dp_rank,
                           tp_group=dims.tp_group)
    return stream, stats


class EncodedStream:
    def __init__(self, loader, encoders, *, seed: int, start_ordinal: int, dp_rank: int, dp_size: int,
                 encoder_dp_size: int = 1, encoder_dp_rank: int = 0, tp_group=None):
        self.loader_iter: Iterator[Batch] = iter(loader)
        self.encoders = encoders
        self.seed = seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.group_size = encoder_dp_size
        self.group_rank = encoder_dp_rank
        self.tp_group = tp_group
        self.ordinal = start_ordinal            # next micro-batch ordinal of this replica
        self._cache: list[EncodedBatch] = []
        self._skip = start_ordinal % encoder_dp_size

    def _fetch(self) -> list[EncodedBatch]:
        batch = next(self.loader_iter)
        # keyed by the replica micro-batch this rank encodes, so encoder DP draws what the run without it draws
        micro_batch = self.ordinal // self.group_size * self.group_size + self.group_rank
        gen = keyed_generator(self.seed, "vae", self.global_micro_batch(micro_batch))
        enc = encode_batch(self.encoders, batch, gen)
        if self.group_size == 1:
            return [enc]
        gathered = []
        for t in enc.tensors():
            parts = [torch.empty_like(t) for _ in range(self.group_size)]
            dist.all_gather(parts, t.contiguous(), group=self.tp_group)
            gathered.append(parts)
        return [EncodedBatch.from_tensors([g[i] for g in gathered]) for i in range(self.group_size)]

    def next(self) -> EncodedBatch:
        """The next micro-batch; StopIteration when the data is exhausted."""
        if not self._cache:
            self._cache = self._fetch()[self._skip:]
            self._skip = 0
        self.ordinal += 1
        return self._cache.pop(0)

    def global_micro_batch(self, ordinal: int) -> int:
        """The DP=1 micro-batch index of this replica's micro-batch `ordinal` (see the module docstring)."""
        return ordinal * self.dp_size + self.dp_rank

    def noise_generator(self, ordinal: int) -> torch.Generator:
        """Sigma/noise generator of a replica micro-batch: same on TP and CP peers and at any DP size."""
        return keyed_generator(self.seed, "noise", self.global_micro_batch(ordinal))
