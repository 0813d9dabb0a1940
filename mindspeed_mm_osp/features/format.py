"""On-disk layout of the feature cache, its provenance, and random access by byte offset.

A cache folder holds

    shard-00000.safetensors   tensors of the kept samples [k·S, (k+1)·S) of the sample index
    shard-00000.json          its manifest: sha256 + size of the shard file, per-tensor offsets,
                              the sample ids it covers and the samples that could not be read
    empty_caption.safetensors the embedding of "" (what a CFG-dropped caption encodes to), stored once
    index.json                provenance + the merged manifests (what training opens)

Tensor names in a shard: `<sample id>/mean`, `<sample id>/logvar` (VAE posterior, (Z, t, h, w), VAE
dtype), `<sample id>/mask` (latent-grid validity (t, h, w), uint8) and, per distinct caption option,
`text/<caption key>/hidden` ((n, C) T5 states of the n valid tokens only, text dtype) and
`text/<caption key>/pooled` ((P,) CLIP `text_embeds`). The reader pads `hidden` back to
`model_max_length` with zeros; the predictor masks those keys out, so the loss is unchanged (the
padding positions of online T5 output are never attended to), and storage drops ~5-20x.

A sample id is `"<annotation record>:<kind>"` (its row in the concatenated annotations and whether
it is a video, an image or a video's frame), stable under any `global_batch_size`; a caption key is
the sha256 of the *raw* caption option, so the training-time CFG choice (made on raw captions with
the online dataset's RNG) finds the embedding of the cleaned caption it stands for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import DataConfig, ModelConfig
from ..data.index import SampleIndex
from ..errors import UserError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
EMPTY_CAPTION_FILE = "empty_caption.safetensors"

# Settings that change no cached tensor: read at training time only.
_TRAIN_TIME_PREPROCESS = ("cfg", "max_read_retries", "max_workers", "timeout", "batch_size",
                          "gradient_accumulation_size")
# Chunked coding is exact for any chunk size; decoding is not part of the cache.
_ENCODE_NEUTRAL_AE = ("tile_latent_frames", "encode_tile_latent_frames")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I64": torch.int64}


class CacheMismatchError(UserError, ValueError):
    """The cache was written for other settings than the current configs."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def sample_id(index: SampleIndex, position: int) -> str:
    return f"{int(index.record[position])}:{int(index.kind[position])}"


def caption_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


def caption_options(cap) -> list[str]:
    """The raw caption choices of one sample, as `CaptionProcessor.choose` sees them."""
    return [str(c) for c in ([cap] if isinstance(cap, str) else list(cap))]


def _abspath(path: Optional[str]) -> Optional[str]:
    return None if path is None else os.path.abspath(path)


def _canonical(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so fresh and loaded provenance compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


def provenance(data_config: DataConfig, model_config: ModelConfig) -> dict:
    """Every setting the cached tensors depend on, grouped as `data`, `vae` and `text`.

    `vae`/`text` are None when the model JSON has no such block (a training JSON with
    load_*_features may omit it); they are then not compared.
    """
    dp = data_config.dataset_param
    preprocess = {k: v for k, v in dataclasses.asdict(dp.preprocess_parameters).items()
                  if k not in _TRAIN_TIME_PREPROCESS}
    data = {"data_path": _abspath(dp.basic_parameters.data_path), "preprocess_parameters": preprocess,
            "use_img_from_vid": dp.use_img_from_vid,
            "collate_param": dataclasses.asdict(data_config.dataloader_param.collate_param)}
    vae = None
    if model_config.ae is not None:
        ae = {k: v for k, v in dataclasses.asdict(model_config.ae).items() if k not in _ENCODE_NEUTRAL_AE}
        ae["from_pretrained"] = _abspath(ae["from_pretrained"])
        vae = {**ae, "sha256": hashlib.sha256(json.dumps(_canonical(ae), sort_keys=True).encode()).hexdigest()}
    text = None
    if model_config.text_encoder is not None:
        t5, clip = model_config.text_encoder, model_config.text_encoder_2
        text = {"t5": _abspath(t5.from_pretrained), "t5_use_attention_mask": t5.use_attention_mask,
                "clip": None if clip is None else _abspath(clip.from_pretrained), "dtype": model_config.weight_dtype,
                "tokenizer": _abspath(dp.tokenizer_config.from_pretrained) if dp.tokenizer_config else None,
                "tokenizer_2": _abspath(dp.tokenizer_config_2.from_pretrained) if dp.tokenizer_config_2 else None,
                "model_max_length": dp.model_max_length, "enable_text_preprocess": dp.enable_text_preprocess,
                **({"caption_template": dp.caption_template} if dp.caption_template else {})}
    return _canonical({"data": data, "vae": vae, "text": text})


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


_SECTION_NAMES = {"data": "data JSON dataset_param", "vae": "model JSON ae", "text": "text encoders/tokenizers"}


def check_provenance(cached: dict, current: dict, *, sections: tuple[str, ...], where: str) -> None:
    """Raise CacheMismatchError naming every setting of `sections` that differs."""
    lines = []
    for section in sections:
        if current.get(section) is None:
            continue  # the current JSON has no such block: nothing to compare against
        if cached.get(section) is None:
            lines.append(f"  {section}: not recorded in the cache (extracted without it)")
            continue
        old, new = _flatten(cached[section], section), _flatten(current[section], section)
        for key in sorted(set(old) | set(new)):
            if key.endswith(".sha256"):
                continue
            if old.get(key) != new.get(key):
                lines.append(f"  {key} ({_SECTION_NAMES[section]}): cache {old.get(key)!r}, config {new.get(key)!r}")
    if lines:
        raise CacheMismatchError(f"feature cache {where} does not match the current config:\n" + "\n".join(lines)
                                 + "\nre-run `python -m mindspeed_mm_osp.tools.extract_features` with these configs "
                                   "or point dataset_param.feature_cache_dir at a matching cache")


def safetensors_offsets(path: str | Path) -> dict[str, dict]:
    """{name: {dtype, shape, offset (absolute), nbytes}} from a safetensors file's header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: {"dtype": e["dtype"], "shape": e["shape"], "offset": 8 + n + e["data_offsets"][0],
                   "nbytes": e["data_offsets"][1] - e["data_offsets"][0]} for name, e in header.items()}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class TensorFiles:
    """Reads tensors by (file, offset, nbytes) with `os.pread`; files are opened lazily per process
    (DataLoader workers fork after the dataset is built, so no descriptor is shared by accident)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    def read(self, file: str, entry: dict) -> torch.Tensor:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.root / file, os.O_RDONLY)
        buf = os.pread(fd, entry["nbytes"], entry["offset"])
        if len(buf) != entry["nbytes"]:
            raise OSError(f"{self.root / file}: short read at offset {entry['offset']} (truncated cache?)")
        dtype = _DTYPES[entry["dtype"]]
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(bytearray(buf), dtype=dtype).reshape(entry["shape"])


__all__ = ["CacheMismatchError", "EMPTY_CAPTION_FILE", "FORMAT_VERSION", "INDEX_FILE", "TensorFiles",
           "caption_key", "caption_options", "check_provenance", "file_sha256", "provenance", "safetensors_offsets",
           "sample_id", "shard_name"]
