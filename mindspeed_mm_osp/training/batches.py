"""Encoded micro-batches for one model replica, with optional encoder data parallelism.

Without `enable_encoder_dp` every TP peer reads the same micro-batch (the loader is
sharded by DP rank) and encodes it redundantly. With it (and TP > 1) the loader is
sharded by world rank, each TP peer encodes a *different* micro-batch, and the encoded
tensors are all-gathered inside the TP group: one fetch round feeds TP consecutive
micro-batches of the replica (reference §5.4), cutting encoder work by TP.

Position is the replica's micro-batch ordinal, so resume is exact: the loader restarts at
the round holding that ordinal and the already-trained entries of the round are skipped.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from .step import EncodedBatch, encode_batch, keyed_generator


class EncodedStream:
    def __init__(self, loader, encoders, *, seed: int, start_ordinal: int, dp_rank: int,
                 encoder_dp_size: int = 1, encoder_dp_rank: int = 0, tp_group=None):
        self.loader_iter: Iterator[dict] = iter(loader)
        self.encoders = encoders
        self.seed = seed
        self.dp_rank = dp_rank
        self.group_size = encoder_dp_size
        self.group_rank = encoder_dp_rank
        self.tp_group = tp_group
        self.ordinal = start_ordinal            # next micro-batch ordinal of this replica
        self._cache: list[EncodedBatch] = []
        self._skip = start_ordinal % encoder_dp_size

    def _fetch(self) -> list[EncodedBatch]:
        batch = next(self.loader_iter)
        fetch_round = self.ordinal // self.group_size
        gen = keyed_generator(self.seed, "vae", fetch_round, self.dp_rank, self.group_rank)
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

    def noise_generator(self, ordinal: int) -> torch.Generator:
        """Sigma/noise generator of a replica micro-batch: same on TP peers, distinct across DP ranks."""
        return keyed_generator(self.seed, "noise", ordinal, self.dp_rank)
