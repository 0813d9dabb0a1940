"""Feature cache: VAE posteriors and text embeddings extracted once, trained from many times.

Extract (any number of ranks, resumable)::

    torchrun --nproc_per_node 8 -m mindspeed_mm_osp.tools.extract_features \
        --mm-data data.json --mm-model model.json --out /cache/osp15

Train from it: set `dataset_param.feature_cache_dir` in the data JSON and `load_video_features` /
`load_text_features` in the model JSON; the trainer then calls `build_cached_dataloader` (same
arguments as `build_train_dataloader` plus the model config). The cache records what it was made
from (`format.provenance`); a cache that does not match the configs is refused with a
`CacheMismatchError` naming each differing setting. Layout: `format`.
"""

from .dataset import CachedT2VDataset, FeatureCache, FeatureCollate, build_cached_dataloader
from .format import CacheMismatchError, provenance
from .writer import ExtractResult, extract_features

__all__ = ["CacheMismatchError", "CachedT2VDataset", "ExtractResult", "FeatureCache", "FeatureCollate",
           "build_cached_dataloader", "extract_features", "provenance"]
