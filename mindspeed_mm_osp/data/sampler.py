"""LengthGroupedSampler: shape-pure global batches, sharded over data-parallel ranks.

Per epoch, with an RNG keyed on (seed, epoch): the members of every shape are permuted and
cut into *steps* of `global_batch_size` samples (the remainder of each shape is left out
this epoch — a different remainder every epoch); the steps are shuffled. A step is split
into `grad_acc` micro-steps of `dp_size · micro_batch_size` samples, and DP rank r takes
the r-th contiguous chunk of `micro_batch_size`. Hence every micro-batch, every DP rank of
a micro-step, and every micro-step of an optimizer step share one shape (the reference mixes
shapes across ranks at group boundaries and deals elements instead of chunks).

The sampler is built from the DP rank/size, never the world rank: TP/CP peers get the
same indices. `grad_acc` is derived from the trainer's real batch sizes (the reference reads
a stale copy from data.json and skips 4× too much on resume). Resuming from
`consumed_samples` (= optimizer steps × global batch) skips exactly the consumed
micro-batches; order is deterministic in (seed, epoch), unlike the reference's fixed seed.
The sampler runs `num_epochs` passes (`pretrain.py --train-epochs`) back to back, and a resume position may fall in
any of them: the epoch is `consumed micro-steps // micro-steps per epoch`, the place in it the remainder.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .dataset import SampleKey


class LengthGroupedSampler:
    """Batch sampler: yields this DP rank's micro-batches as lists of `SampleKey`."""

    def __init__(self, shape_id: np.ndarray, *, micro_batch_size: int, global_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, consumed_samples: int = 0, num_epochs: int = 1):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                             f"{micro_batch_size} x dp_size {dp_size}")
        if consumed_samples % (micro_batch_size * dp_size):
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of micro_batch_size x dp_size")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.shape_id = np.asarray(shape_id, dtype=np.int64)
        self.b, self.gbs, self.rank, self.world = micro_batch_size, global_batch_size, dp_rank, dp_size
        self.grad_acc = global_batch_size // (micro_batch_size * dp_size)
        self.seed, self.num_epochs = seed, num_epochs
        self.consumed_micro_steps = consumed_samples // (micro_batch_size * dp_size)
        order = np.argsort(self.shape_id, kind="stable")
        bounds = np.searchsorted(self.shape_id[order], np.arange(int(self.shape_id.max()) + 2))
        self._groups = [order[bounds[s]:bounds[s + 1]] for s in range(len(bounds) - 1)]
        counts = np.array([len(g) for g in self._groups])
        self.steps_per_epoch = int((counts // self.gbs).sum())
        if self.steps_per_epoch == 0:
            raise ValueError(f"no shape has {self.gbs} samples (one global batch); nothing to train on")
        self.micro_steps_per_epoch = self.steps_per_epoch * self.grad_acc

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(steps, global_batch_size) sample positions of one epoch, identical on all ranks."""
        rng = np.random.default_rng((self.seed, epoch))
        steps = []
        for members in self._groups:
            members = members[rng.permutation(len(members))]
            n = len(members) // self.gbs * self.gbs
            steps.append(members[:n].reshape(-1, self.gbs))
        steps = np.concatenate(steps)
        return steps[rng.permutation(len(steps))]

    def __len__(self) -> int:
        return max(0, self.num_epochs * self.micro_steps_per_epoch - self.consumed_micro_steps)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        mb = self.b * self.world
        first_epoch, skip = divmod(self.consumed_micro_steps, self.micro_steps_per_epoch)
        for epoch in range(first_epoch, self.num_epochs):
            flat = self.epoch_order(epoch).reshape(-1)
            for m in range(skip if epoch == first_epoch else 0, self.micro_steps_per_epoch):
                lo = m * mb + self.rank * self.b
                yield [SampleKey(int(flat[j]), epoch, j) for j in range(lo, lo + self.b)]


__all__ = ["LengthGroupedSampler"]
