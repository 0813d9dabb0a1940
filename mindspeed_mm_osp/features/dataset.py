"""Training from the feature cache: same index, sampler, RNG and retries as the online loader.

`CachedT2VDataset` *is* a `T2VDataset` whose `load_video` returns the cached posterior instead of
decoding pixels and whose caption processor returns cached embeddings instead of token ids.
`__getitem__` — the per-(seed, epoch, slot, attempt) RNG, the caption choice and CFG drop
(`CaptionProcessor.choose`), the same-shape retry on unreadable samples — is inherited, not
copied. The cached `load_video` first draws the frame window the online read would draw
(`SampleIndex.frame_indices`, no file access), so every later draw of an item matches the online
dataset: a sample drops its caption in exactly the epochs it would online.

What differs from online encoding: a clip longer than `num_frames` is cached with *one* temporal
window (its plan's), where the online loader draws a new window each epoch. Videos whose usable
length equals `num_frames`, and images, are identical.

Batches: a `LatentBatch` (`mindspeed_mm_osp.data.batch`) with load_video_features, else the online
`PixelBatch`; the caption is `TextFeatures` with load_text_features, else token ids.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import DataConfig, ModelConfig
from ..config.data import CollateParam, DatasetParam
from ..data import (CaptionProcessor, DatasetStats, GroupLengthCollate, SampleIndex, T2VDataset, TrainDataLoader,
                    assemble_loader, build_index_from_config, make_video_reader)
from ..data.batch import LatentBatch, PixelBatch, stack_text, sum_read_failures
from ..data.readers import ReadError
from .format import (FORMAT_VERSION, INDEX_FILE, CacheMismatchError, TensorFiles, caption_key, check_provenance,
                     provenance, safetensors_offsets, sample_id)

logger = logging.getLogger(__name__)


class FeatureCache:
    """An extracted cache folder (index.json + shards), opened for reading."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / INDEX_FILE
        if not path.is_file():
            raise CacheMismatchError(f"no feature cache at {self.root} ({INDEX_FILE} missing): run "
                                     "`python -m mindspeed_mm_osp.tools.extract_features` first, or finish an "
                                     "interrupted extraction by running it again")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheMismatchError(f"{path}: not a feature-cache index ({e}); re-run extraction") from e
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            meta = meta if isinstance(meta, dict) else {}
            raise CacheMismatchError(f"{path}: cache format {meta.get('format_version')}, this code reads "
                                     f"{FORMAT_VERSION}; re-run extraction")
        try:
            self.provenance: dict = meta["provenance"]
            self.latent: dict = meta["latent"]
            self.text: dict = meta["text"]
            self.samples: dict[str, dict] = meta["samples"]
            self.texts: dict[str, dict] = meta["texts"]
            self.failed: dict[str, dict] = meta["failed"]
            self.shards: list[dict] = meta.get("shards", [])
            z = self.latent["latent_dim"]
            self.shift = torch.tensor(self.latent["shift"], dtype=torch.float32).reshape(1, z, 1, 1, 1)
            self.scale = torch.tensor(self.latent["scale"], dtype=torch.float32).reshape(1, z, 1, 1, 1)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CacheMismatchError(f"{path}: incomplete feature-cache index ({type(e).__name__}: {e}); re-run "
                                     "extraction") from e
        self.files = TensorFiles(self.root)

    def check(self, data_config: DataConfig, model_config: ModelConfig, index: SampleIndex, *, video: bool,
              text: bool) -> list[Optional[str]]:
        """Refuse a cache that does not match the configs or lacks a training sample; returns the
        sample id of every index position (None where it could not be read at extraction)."""
        sections = ("data",) + (("vae",) if video else ()) + (("text",) if text else ())
        check_provenance(self.provenance, provenance(data_config, model_config), sections=sections,
                         where=str(self.root))
        pc = model_config.predictor
        dims = []
        if video:
            dims.append(("latent_dim", self.latent["latent_dim"], "predictor.in_channels", pc.in_channels))
        if text:
            dims.append(("T5 hidden size", self.text["hidden_dim"], "predictor.caption_channels", pc.caption_channels))
            dims.append(("CLIP pooled size", self.text["pooled_dim"], "predictor.pooled_projection_dim",
                         pc.pooled_projection_dim))
            dims.append(("text max length", self.text["max_length"], "dataset_param.model_max_length",
                         data_config.dataset_param.model_max_length))
        for what, cached, key, current in dims:
            if cached != current:
                raise CacheMismatchError(f"feature cache {self.root}: {what} is {cached}, but {key} is {current}")
        ids: list[Optional[str]] = []
        for i in range(len(index)):
            sid = sample_id(index, i)
            rec = self.samples.get(sid) or self.failed.get(sid)
            if rec is None:
                extraction = self.provenance.get("extraction", {})
                raise CacheMismatchError(
                    f"feature cache {self.root} has no sample {sid} ({index.paths[i]}) of the training set: it was "
                    f"extracted with global_batch_size={extraction.get('global_batch_size')} (minority filter) or "
                    "other annotations; extract with --global-batch-size 1 (the default)")
            if rec["path"] != index.paths[i]:
                raise CacheMismatchError(f"feature cache {self.root}: sample {sid} is {rec['path']} in the cache, "
                                         f"{index.paths[i]} in the annotations (annotation files changed)")
            if sid in self.samples and list(index.shape(i)) != rec["shape"]:
                raise CacheMismatchError(f"feature cache {self.root}: sample {sid} ({index.paths[i]}) was cached as "
                                         f"{rec['shape']} (frames, height, width), the data config makes it "
                                         f"{list(index.shape(i))}")
            ids.append(sid if sid in self.samples else None)
        self.check_shards()
        return ids

    def check_shards(self) -> None:
        """Every shard the index lists is there, of its recorded size, with a readable safetensors header: a garbage
        or truncated file is refused here, naming it, instead of feeding garbage tensors to training."""
        for shard in self.shards:
            self._check_shard(shard)

    def _check_shard(self, shard: dict) -> None:
        path = self.root / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise CacheMismatchError(f"feature cache shard {path}: missing or not of its recorded size "
                                     f"{shard['bytes']} bytes; re-run extract_features (it recomputes broken shards)")
        try:
            safetensors_offsets(path)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise CacheMismatchError(f"feature cache shard {path}: not a readable safetensors file ({e}); re-run "
                                     "extract_features (it recomputes broken shards)") from e

    def latents(self, sid: str) -> dict[str, torch.Tensor]:
        rec = self.samples[sid]
        t = {name: self.files.read(rec["file"], entry) for name, entry in rec["tensors"].items()}
        return {"latent_mean": t["mean"], "latent_logvar": t["logvar"], "latent_mask": t["mask"].float()}

    def embedding(self, raw_caption: str) -> dict[str, torch.Tensor]:
        """Cached embedding of the cleaned form of `raw_caption` ("" = the CFG-dropped caption)."""
        return self.text_features(caption_key(raw_caption))

    def text_features(self, key: str) -> dict[str, torch.Tensor]:
        """`text_hidden` zero-padded to max_length, `text_mask`, `text_pooled` of caption key `key`."""
        rec = self.texts[key]
        hidden = self.files.read(rec["file"], rec["tensors"]["hidden"])
        length, max_length = rec["length"], self.text["max_length"]
        padded = hidden.new_zeros(max_length, hidden.shape[1])
        padded[:length] = hidden
        mask = torch.zeros(max_length, dtype=torch.int64)
        mask[:length] = 1
        out = {"text_hidden": padded, "text_mask": mask}
        if "pooled" in rec["tensors"]:
            out["text_pooled"] = self.files.read(rec["file"], rec["tensors"]["pooled"])
        return out


class CachedCaptions:
    """Stands in for `CaptionProcessor`: the same choice and CFG drop, made on raw captions, then
    the cached embedding instead of token ids."""

    def __init__(self, cache: FeatureCache, cfg: float):
        self.cache = cache
        self._choice = CaptionProcessor(None, None, max_length=cache.text["max_length"], cfg=cfg, clean=False)

    def choose(self, cap, rng: np.random.Generator) -> str:
        return self._choice.choose(cap, rng)

    def __call__(self, raw_caption: str) -> dict[str, torch.Tensor]:
        return self.cache.embedding(raw_caption)


class CachedT2VDataset(T2VDataset):
    """`dataset[SampleKey]` → the online item with cached features in place of pixels and/or tokens."""

    def __init__(self, index: SampleIndex, dataset_param: DatasetParam, cache: FeatureCache, ids: list[Optional[str]],
                 *, tokenizer, tokenizer_2, video_reader, seed: int, video: bool, text: bool):
        super().__init__(index, dataset_param, tokenizer=tokenizer, tokenizer_2=tokenizer_2, video_reader=video_reader,
                         seed=seed)
        self.cache, self.ids, self.cached_video = cache, ids, video
        if text:
            self.text = CachedCaptions(cache, dataset_param.preprocess_parameters.cfg)

    def load_video(self, i: int, rng: np.random.Generator):
        if not self.cached_video:
            return super().load_video(i, rng)
        self.index.frame_indices(i, self.preprocess, rng)  # the online read's draws, so later draws stay in step
        if self.ids[i] is None:
            raise ReadError("unreadable_at_extraction", self.index.paths[i])
        return self.cache.latents(self.ids[i])

    def __getitem__(self, key) -> dict:
        item = super().__getitem__(key)
        if self.cached_video:
            item.update(item.pop("video"))
        return item


class FeatureCollate:
    """Stacks cached features of one shape; pixels (when video is read online) go through GroupLengthCollate."""

    def __init__(self, param: CollateParam, cache: FeatureCache):
        self.pixels = GroupLengthCollate(param)
        self.shift, self.scale = cache.shift, cache.scale

    def __call__(self, items: list[dict]) -> LatentBatch | PixelBatch:
        if "video" in items[0]:
            return self.pixels(items)
        shapes = {tuple(it["latent_mean"].shape) for it in items}
        if len(shapes) != 1:
            raise ValueError(f"a micro-batch must have one shape, got {sorted(shapes)}")

        def stack(key: str) -> torch.Tensor:
            return torch.stack([it[key] for it in items])

        return LatentBatch(mean=stack("latent_mean"), logvar=stack("latent_logvar"), latent_mask=stack("latent_mask"),
                           shift=self.shift, scale=self.scale, text=stack_text(items),
                           read_failures=sum_read_failures(items))


def build_cached_dataloader(data_config: DataConfig, model_config: ModelConfig, *, tokenizer, tokenizer_2,
                            dp_rank: int, dp_size: int, micro_batch_size: int, global_batch_size: int,
                            consumed_samples: int, seed: int, num_workers: Optional[int] = None, num_epochs: int = 1,
                            cache_dir: Optional[str | Path] = None,
                            index: Optional[tuple] = None) -> tuple[TrainDataLoader, DatasetStats]:
    """`build_train_dataloader` reading `model_config.load_video_features` / `load_text_features`
    from the cache in `cache_dir` (default `dataset_param.feature_cache_dir`).

    Same index, sampler (sharding, resume from `consumed_samples`) and per-item RNG as the online
    loader. Refuses (CacheMismatchError) a cache whose provenance differs from the configs.
    Tokenizers are only needed when text is not cached; `index`: `build_index_from_config`'s result, if known.
    """
    dp = data_config.dataset_param
    cache_dir = cache_dir if cache_dir is not None else dp.feature_cache_dir
    video, text = model_config.load_video_features, model_config.load_text_features
    if cache_dir is None:
        raise ValueError("load_video_features/load_text_features need the feature cache: set "
                         "dataset_param.feature_cache_dir in the data JSON")
    if not (video or text):
        raise ValueError("build_cached_dataloader: the model JSON loads neither video nor text features")
    index, fstats = index or build_index_from_config(data_config, global_batch_size=global_batch_size)
    cache = FeatureCache(cache_dir)
    ids = cache.check(data_config, model_config, index, video=video, text=text)
    dataset = CachedT2VDataset(index, dp, cache, ids, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                               video_reader=make_video_reader(dp.preprocess_parameters.video_reader_type), seed=seed,
                               video=video, text=text)
    loader, stats = assemble_loader(data_config, index, fstats, dataset, FeatureCollate(
        data_config.dataloader_param.collate_param, cache), dp_rank=dp_rank, dp_size=dp_size,
        micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, consumed_samples=consumed_samples,
        seed=seed, num_workers=num_workers, num_epochs=num_epochs)
    logger.info("training from feature cache %s (%s%s)", cache_dir, "latents" if video else "",
                " + text" if text and video else "text" if text else "")
    return loader, stats


__all__ = ["CachedCaptions", "CachedT2VDataset", "FeatureCache", "FeatureCollate", "build_cached_dataloader"]
