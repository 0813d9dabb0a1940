"""Open-Sora Plan v1.5 text-to-video data pipeline (spec: shared/reference/data.md).

data.txt + annotation JSON → startup filter with per-reason counters (`index`) → dataset
(decord/PyAV/PIL readers, transforms, caption cleaning, CFG drop, two tokenizers) →
`LengthGroupedSampler` (one shape per global batch, sharded by DP rank) → `GroupLengthCollate`.

Training::

    loader, stats = build_train_dataloader(data_config, tokenizer=t5_tok, tokenizer_2=clip_tok,
        dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=mbs, global_batch_size=gbs,
        consumed_samples=consumed, seed=seed)

Each batch is a fresh dict:

=================== ================== =========================================================
key                 dtype, shape       meaning
=================== ================== =========================================================
video               float32 (B,3,T,H,W) pixels in [-1, 1] (bicubic overshoot not clamped); images T=1
input_ids           int64 (B,1,L)      T5 ids, L = dataset_param.model_max_length (512)
attention_mask      int64 (B,1,L)      T5 mask
input_ids_2         int64 (B,1,77)     CLIP ids (absent when tokenizer_2 is None)
attention_mask_2    int64 (B,1,77)     CLIP mask (absent when tokenizer_2 is None)
latent_mask         float32 (B,T',H',W') 1 on each sample's valid VAE-latent box
=================== ================== =========================================================

`stats.filter` holds the startup counters (`.table()`, `.as_dict()`), `stats.read_failures`
the per-reason count of files that could not be read (each retried on a same-shape sample).

Feature extraction: `iter_annotation_plans(data_config, seed=...)` yields every kept sample
with its path, caption, final (frames, height, width) and source frame indices, without
reading any file; `T2VDataset.load_video(plan.position, plan_rng(seed, plan.position))`
then decodes exactly those frames (build the dataset from `build_index_from_config`).
"""

from .annotations import load_annotations, parse_data_txt
from .collate import GroupLengthCollate
from .dataset import CaptionProcessor, SampleKey, T2VDataset
from .index import (FilterStats, SampleIndex, SamplePlan, SampleShape, build_index, iter_plans, media_kind,
                    plan_rng)
from .loader import (DatasetStats, TrainDataLoader, assemble_loader, build_index_from_config, build_train_dataloader,
                     iter_annotation_plans)
from .readers import DecordReader, PyAVReader, ReadError, make_video_reader, read_image
from .sampler import LengthGroupedSampler

__all__ = [
    "CaptionProcessor", "DatasetStats", "DecordReader", "FilterStats", "GroupLengthCollate", "LengthGroupedSampler",
    "PyAVReader", "ReadError", "SampleIndex", "SampleKey", "SamplePlan", "SampleShape", "T2VDataset",
    "TrainDataLoader", "assemble_loader", "build_index", "build_index_from_config", "build_train_dataloader",
    "iter_annotation_plans",
    "iter_plans", "load_annotations", "make_video_reader", "media_kind", "parse_data_txt", "plan_rng", "read_image",
]
