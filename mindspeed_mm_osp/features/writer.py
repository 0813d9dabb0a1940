"""Feature extraction: VAE posteriors and text embeddings of every kept sample, written once.

The kept samples (the training index, built by the same startup filter) are cut into shards of
`shard_size` consecutive positions; shard k belongs to rank `k mod world_size`, so ranks work on
disjoint shards and the split does not depend on the world size of an earlier, interrupted run.

Each sample is decoded exactly as its `SamplePlan` says (`T2VDataset.load_video(position,
plan_rng(seed, position))`), padded and masked by `GroupLengthCollate`, and encoded to the WF-VAE
posterior (mean, logvar): training still draws the posterior sample, with its own keyed generator,
as online encoding does. Every raw caption option is cleaned as `CaptionProcessor` cleans it and
encoded by T5 (valid tokens only) and CLIP (pooled); "" is encoded once for CFG drops.

Resume: a shard is finished when its manifest exists, names the same samples and provenance, and
the shard file has the recorded size and sha256; finished shards are never recomputed. Files are
written to a temporary name and renamed, the manifest last, so an interruption leaves no shard
that looks finished but is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import platform
from ..config import DataConfig, ModelConfig
from ..data import CaptionProcessor, GroupLengthCollate, SamplePlan, T2VDataset, build_index_from_config, iter_plans
from ..data import make_video_reader, plan_rng
from ..data.readers import ReadError
from ..io_atomic import atomic_save_safetensors, atomic_write_text
from .format import (EMPTY_CAPTION_FILE, FORMAT_VERSION, INDEX_FILE, TensorFiles, caption_key, caption_options,
                     file_sha256, provenance, safetensors_offsets, sample_id, shard_name)

logger = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    computed: list[int] = field(default_factory=list)  # shards encoded by this rank in this run
    reused: list[int] = field(default_factory=list)  # shards of this rank found finished on disk
    complete: bool = False  # index.json written and verified
    index_path: Optional[Path] = None


class _Encoders:
    """WF-VAE, T5(+CLIP) and their tokenizers on this rank's device, in the training dtypes
    (`--model_custom_precision`: VAE in `ae.dtype`, text encoders in `weight_dtype`)."""

    def __init__(self, data_config: DataConfig, model_config: ModelConfig):
        from ..models.ae import VideoAutoencoder
        from ..models.text import TextEncoders, load_tokenizer

        dp = data_config.dataset_param
        if model_config.ae is None or model_config.text_encoder is None or dp.tokenizer_config is None:
            raise ValueError("feature extraction needs the model JSON's `ae` and `text_encoder` blocks and the data "
                             "JSON's tokenizer_config")
        if (model_config.text_encoder_2 is None) != (dp.tokenizer_config_2 is None):
            raise ValueError("text_encoder_2 (model JSON) and tokenizer_config_2 (data JSON) must be set together")
        device = platform.device()
        self.device = device
        self.vae = VideoAutoencoder(model_config.ae).to(device)
        self.text = TextEncoders.from_config(model_config.text_encoder, model_config.text_encoder_2,
                                             dtype=model_config.weight_dtype).to(device)
        self.tokenizer = load_tokenizer(dp.tokenizer_config)
        self.tokenizer_2 = load_tokenizer(dp.tokenizer_config_2) if dp.tokenizer_config_2 else None
        self.max_length = dp.model_max_length

    def encode_texts(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per text: `hidden` (n valid tokens, C) and `pooled` (P,) when CLIP is configured."""
        from ..models.text import CLIP_MAX_LENGTH, tokenize

        ids, mask = tokenize(texts, self.tokenizer, self.max_length)
        ids2 = mask2 = None
        if self.tokenizer_2 is not None:
            ids2, mask2 = tokenize(texts, self.tokenizer_2, CLIP_MAX_LENGTH)
        hidden, mask, pooled = self.text.encode(ids, mask, ids2, mask2)
        out = []
        for j in range(len(texts)):
            n = int(mask[j].sum())
            if not bool(mask[j, :n].all()):
                raise ValueError("T5 mask is not a prefix of valid tokens (left padding?); "
                                 "cannot store valid tokens only")
            item = {"hidden": hidden[j, :n].cpu().clone()}
            if pooled is not None:
                item["pooled"] = pooled[j].cpu().clone()
            out.append(item)
        return out


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], prov_sha: str) -> dict[str, dict]:
    """Write a safetensors file atomically (provenance hash in its metadata); returns its per-tensor offsets."""
    atomic_save_safetensors(tensors, path, {"provenance_sha256": prov_sha})
    return safetensors_offsets(path)


class _ShardWriter:
    def __init__(self, out: Path, data_config: DataConfig, encoders: _Encoders, dataset: T2VDataset,
                 collate: GroupLengthCollate, *, seed: int, batch_size: int, text_batch_size: int, prov_sha: str):
        self.out, self.enc, self.dataset, self.collate = out, encoders, dataset, collate
        self.seed, self.batch_size, self.text_batch_size, self.prov_sha = seed, batch_size, text_batch_size, prov_sha
        dp = data_config.dataset_param
        # One option and cfg=0: `choose` is then exactly the online cleaning (which, like the reference loader,
        # cleans a caption twice) and never drops it.
        self._cleaner = CaptionProcessor(None, None, max_length=dp.model_max_length, cfg=0.0,
                                         clean=dp.enable_text_preprocess, template=dp.caption_template)

    def clean(self, raw: str) -> str:
        return self._cleaner.choose([raw], np.random.default_rng(0))

    def finished(self, k: int, ids: list[str]) -> bool:
        manifest_path = self.out / f"{shard_name(k)}.json"
        if not manifest_path.is_file():
            return False
        try:
            m = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            return False
        shard = self.out / m["file"]
        return (m.get("provenance_sha256") == self.prov_sha and m.get("ids") == ids and shard.is_file()
                and shard.stat().st_size == m["bytes"] and file_sha256(shard) == m["sha256"])

    def write(self, k: int, plans: list[SamplePlan], index, progress) -> None:
        tensors: dict[str, torch.Tensor] = {}
        samples: dict[str, dict] = {}
        failed: dict[str, dict] = {}
        pending: dict[tuple, list] = {}
        texts: dict[str, str] = {}  # caption key -> cleaned text

        def flush(shape) -> None:
            group = pending.pop(shape)
            batch = self.collate([{"video": video} for _, _, video in group])
            mean, logvar = self.enc.vae.encode_posterior(batch.video.to(self.enc.device))
            for j, (sid, plan, _) in enumerate(group):
                tensors[f"{sid}/mean"] = mean[j].cpu().clone()
                tensors[f"{sid}/logvar"] = logvar[j].cpu().clone()
                tensors[f"{sid}/mask"] = batch.latent_mask[j].to(torch.uint8).clone()
                fi = plan.frame_indices
                samples[sid] = {"position": plan.position, "path": plan.path, "shape": list(plan.shape),
                                "frames": [int(fi[0]), int(fi[-1]), len(fi)],
                                "latent_shape": list(mean.shape[1:]), "captions": []}
                for raw in caption_options(plan.caption):
                    key = caption_key(raw)
                    samples[sid]["captions"].append(key)
                    if key not in texts:
                        texts[key] = self.clean(raw)
            progress.update(len(group))

        for plan in plans:
            sid = sample_id(index, plan.position)
            try:
                video = self.dataset.load_video(plan.position, plan_rng(self.seed, plan.position))
            except ReadError as e:
                failed[sid] = {"position": plan.position, "path": plan.path, "reason": e.reason}
                logger.warning("sample %s not cached: %s", sid, e)
                progress.update(1)
                continue
            pending.setdefault(tuple(plan.shape), []).append((sid, plan, video))
            if len(pending[tuple(plan.shape)]) >= self.batch_size:
                flush(tuple(plan.shape))
        for shape in list(pending):
            flush(shape)

        keys = list(texts)
        for lo in range(0, len(keys), self.text_batch_size):
            chunk = keys[lo:lo + self.text_batch_size]
            for key, emb in zip(chunk, self.enc.encode_texts([texts[key] for key in chunk])):
                for name, t in emb.items():
                    tensors[f"text/{key}/{name}"] = t

        file = f"{shard_name(k)}.safetensors"
        offsets = _save_shard(self.out / file, tensors, self.prov_sha)
        for sid, rec in samples.items():
            rec["tensors"] = {name: offsets[f"{sid}/{name}"] for name in ("mean", "logvar", "mask")}
        text_records = {key: {"length": int(offsets[f"text/{key}/hidden"]["shape"][0]),
                              "tensors": {name: offsets[f"text/{key}/{name}"] for name in ("hidden", "pooled")
                                          if f"text/{key}/{name}" in offsets}} for key in keys}
        atomic_write_text(self.out / f"{shard_name(k)}.json", json.dumps({
            "format_version": FORMAT_VERSION, "provenance_sha256": self.prov_sha, "shard": k, "file": file,
            "bytes": (self.out / file).stat().st_size, "sha256": file_sha256(self.out / file),
            "ids": [sample_id(index, p.position) for p in plans], "samples": samples, "texts": text_records,
            "failed": failed}))


def _write_empty_caption(out: Path, writer: _ShardWriter) -> dict:
    """The embedding of "" (a CFG-dropped caption), written once; reused when present and valid."""
    from safetensors import safe_open

    key = caption_key("")
    path = out / EMPTY_CAPTION_FILE
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("provenance_sha256") == writer.prov_sha:
                return safetensors_offsets(path)
    emb = writer.enc.encode_texts([writer.clean("")])[0]
    return _save_shard(path, {f"text/{key}/{name}": t for name, t in emb.items()}, writer.prov_sha)


def _finalize(out: Path, num_shards: int, num_samples: int, prov: dict, prov_sha: str, model_config: ModelConfig,
              encoders: _Encoders, empty_offsets: dict) -> Path:
    """Merge the manifests into index.json, then reopen every shard and check names, shapes and count."""
    from safetensors import safe_open

    samples, texts, failed, shards = {}, {}, {}, []
    for k in range(num_shards):
        manifest_path = out / f"{shard_name(k)}.json"
        if not manifest_path.is_file():
            raise RuntimeError(f"{manifest_path} is missing: shard {k} was not extracted (did a rank fail?)")
        m = json.loads(manifest_path.read_text())
        if m["provenance_sha256"] != prov_sha:
            raise RuntimeError(f"{manifest_path} was written for other settings; re-run extraction")
        shards.append({"file": m["file"], "sha256": m["sha256"], "bytes": m["bytes"], "samples": len(m["samples"])})
        for sid, rec in m["samples"].items():
            samples[sid] = {**rec, "file": m["file"]}
        for key, rec in m["texts"].items():
            texts.setdefault(key, {**rec, "file": m["file"]})
        failed.update(m["failed"])
    key = caption_key("")
    texts[key] = {"length": int(empty_offsets[f"text/{key}/hidden"]["shape"][0]), "file": EMPTY_CAPTION_FILE,
                  "tensors": {name: empty_offsets[f"text/{key}/{name}"] for name in ("hidden", "pooled")
                              if f"text/{key}/{name}" in empty_offsets}}

    # Verify what was written: every recorded tensor exists with its shape, offsets read back the same bytes.
    if len(samples) + len(failed) != num_samples:
        raise RuntimeError(f"cache holds {len(samples)} samples + {len(failed)} unreadable, expected {num_samples}")
    by_file: dict[str, list[tuple[str, dict]]] = {}
    for sid, rec in samples.items():
        by_file.setdefault(rec["file"], []).extend((f"{sid}/{n}", e) for n, e in rec["tensors"].items())
    for key, rec in texts.items():
        by_file.setdefault(rec["file"], []).extend((f"text/{key}/{n}", e) for n, e in rec["tensors"].items())
    reader = TensorFiles(out)
    for file, entries in by_file.items():
        with safe_open(str(out / file), framework="pt") as f:
            names = set(f.keys())
            for name, entry in entries:
                if name not in names or list(f.get_slice(name).get_shape()) != entry["shape"]:
                    raise RuntimeError(f"{out / file}: tensor {name} missing or of the wrong shape")
            name, entry = entries[0]
            if not torch.equal(f.get_tensor(name), reader.read(file, entry)):
                raise RuntimeError(f"{out / file}: offsets of {name} do not read back the stored tensor")

    ae = model_config.ae
    index = {
        "format_version": FORMAT_VERSION, "provenance": prov, "provenance_sha256": prov_sha,
        "latent": {"latent_dim": ae.latent_dim, "shift": list(ae.shift), "scale": list(ae.scale), "dtype": ae.dtype},
        "text": {"max_length": encoders.max_length, "hidden_dim": encoders.text.hidden_size,
                 "pooled_dim": encoders.text.pooled_size},
        "num_samples": num_samples, "shards": shards, "samples": samples, "texts": texts, "failed": failed,
    }
    atomic_write_text(out / INDEX_FILE, json.dumps(index))
    logger.info("feature cache %s: %d samples (%d unreadable, skipped), %d captions, %d shards, %.1f MiB",
                out, len(samples), len(failed), len(texts), num_shards,
                sum(s["bytes"] for s in shards) / 2 ** 20)
    return out / INDEX_FILE


def _shard_positions(k: int, shard_size: int, n: int) -> range:
    return range(k * shard_size, min((k + 1) * shard_size, n))


def _build_writer(data_config: DataConfig, model_config: ModelConfig, out: Path, index, *, seed: int,
                  batch_size: int, text_batch_size: int, prov_sha: str) -> _ShardWriter:
    """The dataset (decoding as training does), the encoders and the collate that shards are written with."""
    dp = data_config.dataset_param
    dataset = T2VDataset(index, dp, tokenizer=None, tokenizer_2=None,
                         video_reader=make_video_reader(dp.preprocess_parameters.video_reader_type), seed=seed)
    return _ShardWriter(out, data_config, _Encoders(data_config, model_config), dataset,
                        GroupLengthCollate(data_config.dataloader_param.collate_param),
                        seed=seed, batch_size=batch_size, text_batch_size=text_batch_size, prov_sha=prov_sha)


def _shards_to_encode(writer: _ShardWriter, index, shard_size: int, rank: int, world: int,
                      result: ExtractResult) -> list[int]:
    """This rank's shards (k mod world == rank) not already finished on disk; the finished go to `result.reused`."""
    todo: list[int] = []
    for k in range(rank, math.ceil(len(index) / shard_size), world):
        ids = [sample_id(index, p) for p in _shard_positions(k, shard_size, len(index))]
        (result.reused if writer.finished(k, ids) else todo).append(k)
    if result.reused:
        logger.info("rank %d: %d finished shards found, not recomputed: %s", rank, len(result.reused), result.reused)
    return todo


def _encode_shards(writer: _ShardWriter, index, preprocess, todo: list[int], *, shard_size: int, seed: int,
                   rank: int, world: int, progress: bool, result: ExtractResult) -> dict:
    """Encode and write the shards `todo` (rank 0 also the empty caption); returns the empty caption's offsets."""
    from tqdm import tqdm

    n = len(index)
    total = sum(len(_shard_positions(k, shard_size, n)) for k in todo)
    todo_set = set(todo)
    with torch.no_grad(), tqdm(total=total, desc=f"extract features (rank 0 of {world})", unit="sample",
                               disable=rank != 0 or not progress, dynamic_ncols=True) as bar:
        empty_offsets = _write_empty_caption(writer.out, writer) if rank == 0 else {}
        plans: list[SamplePlan] = []
        for plan in iter_plans(index, preprocess, seed):
            k = plan.position // shard_size
            if k not in todo_set:
                continue
            plans.append(plan)
            if plan.position == _shard_positions(k, shard_size, n)[-1]:
                writer.write(k, plans, index, bar)
                result.computed.append(k)
                plans = []
    return empty_offsets


def extract_features(data_config: DataConfig, model_config: ModelConfig, out_dir: str | Path, *,
                     shard_size: int = 32, batch_size: int = 1, text_batch_size: int = 64, seed: int = 1234,
                     global_batch_size: int = 1, stop_after_shards: Optional[int] = None,
                     progress: bool = True) -> ExtractResult:
    """Extract this rank's shards into `out_dir` (rank/world from torch.distributed when initialised).

    `global_batch_size` sets the minority filter: the default 1 keeps every shape with at least
    `min_samples_per_shape_factor` samples, a superset of what any training run keeps, so one cache serves every
    batch size. `seed` picks
    the temporal window of clips longer than `num_frames` (a cache stores one window per clip).
    `stop_after_shards` stops after encoding that many shards, without writing the index (tests:
    an interrupted run). Returns what was computed/reused; rank 0's result says where index.json is.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(data_config, model_config)
    prov["extraction"] = {"global_batch_size": global_batch_size, "plan_seed": seed, "shard_size": shard_size}
    prov_sha = _sha(prov)

    index, _ = build_index_from_config(data_config, global_batch_size=global_batch_size)
    writer = _build_writer(data_config, model_config, out, index, seed=seed, batch_size=batch_size,
                           text_batch_size=text_batch_size, prov_sha=prov_sha)
    result = ExtractResult()
    todo = _shards_to_encode(writer, index, shard_size, rank, world, result)
    if stop_after_shards is not None:
        todo = todo[:stop_after_shards]
    empty_offsets = _encode_shards(writer, index, data_config.dataset_param.preprocess_parameters, todo,
                                   shard_size=shard_size, seed=seed, rank=rank, world=world, progress=progress,
                                   result=result)
    if stop_after_shards is not None:
        return result
    if distributed:
        dist.barrier()
    if rank == 0:
        _finalize(out, math.ceil(len(index) / shard_size), len(index), prov, prov_sha, model_config, writer.enc,
                  empty_offsets)
    if distributed:
        dist.barrier()
    result.complete, result.index_path = True, out / INDEX_FILE
    return result


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


__all__ = ["ExtractResult", "extract_features"]
