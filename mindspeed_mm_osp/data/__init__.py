"""Open-Sora Plan v1.5 text-to-video data pipeline (docs/data.md).

data.txt + annotation JSON → startup filter with per-reason counters (`index`) → dataset
(decord/PyAV/PIL readers, transforms, caption cleaning, CFG drop, two tokenizers) →
`LengthGroupedSampler` (one shape per global batch, sharded by DP rank) → `GroupLengthCollate`.

Training::

    loader, stats = build_train_dataloader(data_config, tokenizer=t5_tok, tokenizer_2=clip_tok,
        dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=mbs, global_batch_size=gbs,
        consumed_samples=consumed, seed=seed)

Each batch is a `PixelBatch` (an `I2VBatch` with `mask_config`) of `data.batch`, whose fields state
their shapes and dtypes; docs/data.md describes the annotations and the batches.

`stats.filter` holds the startup counters (`.table()`), `stats.read_failures`
the per-reason count of files that could not be read (each retried on a same-shape sample).

Feature extraction: `iter_annotation_plans(data_config, seed=...)` yields every kept sample
with its path, caption, final (frames, height, width) and source frame indices, without
reading any file; `T2VDataset.load_video(plan.position, plan_rng(seed, plan.position))`
then decodes exactly those frames (build the dataset from `build_index_from_config`).
"""

from .annotations import load_annotations, parse_data_txt
from .batch import Batch, I2VBatch, LatentBatch, PixelBatch, TextFeatures, TokenIds
from .collate import GroupLengthCollate
from .dataset import CaptionProcessor, SampleKey, T2VDataset
from .index import (FilterStats, SampleIndex, SamplePlan, SampleShape, build_index, iter_plans, media_kind,
                    plan_rng)
from .loader import (DatasetStats, TrainDataLoader, assemble_loader, build_index_from_config, build_train_dataloader,
                     iter_annotation_plans)
from .readers import DecordReader, PyAVReader, ReadError, make_video_reader, read_image
from .sampler import LengthGroupedSampler

__all__ = [
    "Batch", "CaptionProcessor", "DatasetStats", "DecordReader", "FilterStats", "GroupLengthCollate", "I2VBatch",
    "LatentBatch", "LengthGroupedSampler", "PixelBatch", "PyAVReader", "ReadError", "SampleIndex", "SampleKey",
    "SamplePlan", "SampleShape", "T2VDataset", "TextFeatures", "TokenIds", "TrainDataLoader", "assemble_loader",
    "build_index", "build_index_from_config", "build_train_dataloader", "iter_annotation_plans", "iter_plans",
    "load_annotations", "make_video_reader", "media_kind", "parse_data_txt", "plan_rng", "read_image",
]
