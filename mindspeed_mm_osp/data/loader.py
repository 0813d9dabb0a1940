"""Entry points: the training DataLoader and annotation plans for feature extraction."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from ..config.data import DataConfig
from .annotations import load_annotations
from .batch import Batch
from .collate import GroupLengthCollate
from .dataset import BROKEN_ON_PURPOSE, T2VDataset, broken_on_purpose
from .index import FilterStats, SampleIndex, SamplePlan, build_index, iter_plans
from .readers import make_video_reader
from .sampler import LengthGroupedSampler

logger = logging.getLogger(__name__)


@dataclass
class DatasetStats:
    """Startup filter report plus read failures, updated as batches are consumed."""

    filter: FilterStats
    samples: int
    steps_per_epoch: int
    read_failures: Counter = field(default_factory=Counter)


class TrainDataLoader:
    """Iterates batches of a `torch.utils.data.DataLoader`, adding each batch's
    `read_failures` (counted inside worker processes) to `stats.read_failures`."""

    def __init__(self, loader: torch.utils.data.DataLoader, stats: DatasetStats):
        self.loader, self.stats = loader, stats

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if batch.read_failures:
                self.stats.read_failures.update(batch.read_failures)
            yield batch


def build_index_from_config(data_config: DataConfig, *, global_batch_size: int) -> tuple[SampleIndex, FilterStats]:
    """Load data.txt's annotations and run the startup filter; logs its summary line (the table at DEBUG)."""
    dp = data_config.dataset_param
    loaded = load_annotations(dp.basic_parameters.data_path)
    index, stats = build_index(loaded.records, dp.preprocess_parameters, global_batch_size=global_batch_size,
                               use_img_from_vid=dp.use_img_from_vid, dropped=loaded.dropped,
                               first_dropped=loaded.first_dropped,
                               allow_paths_outside_data_folder=dp.basic_parameters.allow_paths_outside_data_folder)
    deliberate = broken_on_purpose(dp.basic_parameters.data_path)
    note = f"; {len(deliberate)} files broken on purpose ({BROKEN_ON_PURPOSE})" if deliberate else ""
    logger.info("annotation filter (%s): %s%s (full table: OSP_LOG_LEVEL=DEBUG)", dp.basic_parameters.data_path,
                stats.summary(), note)
    logger.debug("annotation filter table:\n%s", stats.table())
    return index, stats


def build_train_dataloader(data_config: DataConfig, *, tokenizer, tokenizer_2, dp_rank: int, dp_size: int,
                           micro_batch_size: int, global_batch_size: int, consumed_samples: int, seed: int,
                           num_workers: Optional[int] = None, num_epochs: int = 1,
                           index: Optional[tuple[SampleIndex, FilterStats]] = None) -> tuple[TrainDataLoader, DatasetStats]:
    """The training loader of one DP rank (pass the DP rank/size, not the world rank: TP
    peers must build the same loader) and the dataset statistics.

    `global_batch_size / (micro_batch_size · dp_size)` is the real gradient accumulation;
    `consumed_samples` (optimizer steps × global batch) resumes exactly where a run stopped, in any of the
    `num_epochs` passes. `index`: `build_index_from_config`'s result when the caller has it already.
    Batches: see the package docstring.
    """
    index, fstats = index or build_index_from_config(data_config, global_batch_size=global_batch_size)
    dp = data_config.dataset_param
    dataset = T2VDataset(index, dp, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                         video_reader=make_video_reader(dp.preprocess_parameters.video_reader_type), seed=seed)
    return assemble_loader(data_config, index, fstats, dataset, GroupLengthCollate(data_config.dataloader_param
                                                                                   .collate_param),
                           dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=micro_batch_size,
                           global_batch_size=global_batch_size, consumed_samples=consumed_samples, seed=seed,
                           num_workers=num_workers, num_epochs=num_epochs)


def assemble_loader(data_config: DataConfig, index: SampleIndex, filter_stats: FilterStats, dataset, collate_fn, *,
                    dp_rank: int, dp_size: int, micro_batch_size: int, global_batch_size: int, consumed_samples: int,
                    seed: int, num_workers: Optional[int] = None,
                    num_epochs: int = 1) -> tuple[TrainDataLoader, DatasetStats]:
    """Grouped sampler + DataLoader around any dataset over `index` (online frames or cached features)."""
    sampler = LengthGroupedSampler(index.shape_id, micro_batch_size=micro_batch_size,
                                   global_batch_size=global_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                                   consumed_samples=consumed_samples, num_epochs=num_epochs)
    dl = data_config.dataloader_param
    workers = dl.num_workers if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                         num_workers=workers, pin_memory=dl.pin_memory)
    stats = DatasetStats(filter=filter_stats, samples=len(index), steps_per_epoch=sampler.steps_per_epoch)
    return TrainDataLoader(loader, stats), stats


def iter_annotation_plans(data_config: DataConfig, *, seed: int, global_batch_size: int = 1) -> Iterator[SamplePlan]:
    """Every kept sample with its final (frames, h, w) and source frame indices, without
    reading any video (feature extraction). `global_batch_size` sets the minority filter
    (`min_samples_per_shape_factor` × it); use the training value to extract exactly the training set."""
    index, _ = build_index_from_config(data_config, global_batch_size=global_batch_size)
    yield from iter_plans(index, data_config.dataset_param.preprocess_parameters, seed)


__all__ = ["DatasetStats", "TrainDataLoader", "assemble_loader", "build_index_from_config", "build_train_dataloader",
           "iter_annotation_plans"]
