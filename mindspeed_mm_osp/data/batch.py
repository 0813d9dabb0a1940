"""Typed micro-batches: what the collate functions build and `training.step.encode_batch` consumes.

A batch's kind is its type, never guessed from the keys it holds:

- `PixelBatch`: clips read online (text-to-video);
- `I2VBatch`: a `PixelBatch` plus the per-frame condition mask (image-to-video);
- `LatentBatch`: VAE posteriors read from the feature cache.

Each carries its caption as `TokenIds` (tokenized online) or `TextFeatures` (read from the feature cache).

Every tensor field states its contract with `tensor_field`: dimension names and dtype. A letter names a size
that must agree across all tensors of one batch (text included), a digit a fixed size; dtype None means "any
floating dtype" (the VAE's or the text encoders'). The check runs when a batch is built, so a collate that
drifts from the contract fails there, not deep inside the model.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

import torch


def tensor_field(dims: str, dtype: Optional[torch.dtype] = None, *, optional: bool = False):
    """A tensor field of shape `dims` (space-separated names) and `dtype`; `optional` fields default to None."""
    spec = {"dims": tuple(dims.split()), "dtype": dtype}
    return field(default=None, metadata=spec) if optional else field(metadata=spec)


def _check(obj, sizes: dict[str, int]) -> None:
    """Raise ValueError unless every tensor of `obj` (and its nested text) matches its `tensor_field`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, _Contract):
            _check(value, sizes)
        if "dims" not in f.metadata or value is None:
            continue
        dims, dtype, name = f.metadata["dims"], f.metadata["dtype"], f"{type(obj).__name__}.{f.name}"
        if not isinstance(value, torch.Tensor) or value.ndim != len(dims):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name}: expected a tensor of shape ({', '.join(dims)}), got {got}")
        if (value.dtype != dtype) if dtype is not None else not value.dtype.is_floating_point:
            raise ValueError(f"{name}: expected dtype {dtype or 'floating point'}, got {value.dtype}")
        shape = tuple(value.shape)
        for dim, size in zip(dims, shape):
            if dim.isdigit() and size != int(dim):
                raise ValueError(f"{name}: a dimension is {size}, the contract fixes it at {dim} (shape {shape})")
            if not dim.isdigit() and size != sizes.setdefault(dim, size):
                raise ValueError(f"{name}: dimension {dim} is {size}, other tensors of the batch make it {sizes[dim]} "
                                 f"(shape {shape})")


class _Contract:
    """Checks the `tensor_field` contract on construction; `pin_memory` serves the DataLoader's pin_memory."""

    def __post_init__(self) -> None:
        _check(self, {})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that is set, by field name (the caption's as `text.<name>`): to compare or hash batches."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Contract):
                out.update({f"{f.name}.{k}": v for k, v in value.tensors().items()})
            elif isinstance(value, torch.Tensor):
                out[f.name] = value
        return out

    def pin_memory(self):
        pinned = {f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                  if isinstance(getattr(self, f.name), (torch.Tensor, _Contract))}
        return dataclasses.replace(self, **pinned)


@dataclass(frozen=True, kw_only=True)
class TokenIds(_Contract):
    """Caption token ids, one caption per sample; L = dataset_param.model_max_length."""

    input_ids: torch.Tensor = tensor_field("B 1 L", torch.int64)         # T5 ids
    attention_mask: torch.Tensor = tensor_field("B 1 L", torch.int64)    # 1 = valid token
    # CLIP ids and mask (77 tokens); None without a second tokenizer
    input_ids_2: Optional[torch.Tensor] = tensor_field("B 1 77", torch.int64, optional=True)
    attention_mask_2: Optional[torch.Tensor] = tensor_field("B 1 77", torch.int64, optional=True)


@dataclass(frozen=True, kw_only=True)
class TextFeatures(_Contract):
    """Cached text-encoder outputs (text encoders' dtype); L = the cache's max_length."""

    hidden: torch.Tensor = tensor_field("B L C")                      # T5 states, zero past each caption's tokens
    mask: torch.Tensor = tensor_field("B L", torch.int64)             # 1 = valid token
    pooled: Optional[torch.Tensor] = tensor_field("B P", optional=True)  # CLIP text_embeds; None without CLIP


Text = Union[TokenIds, TextFeatures]


@dataclass(frozen=True, kw_only=True)
class PixelBatch(_Contract):
    """Clips read online, zero-padded at the end of T/H/W to what the VAE and patch embedding need.

    `text` is None only where clips are collated without captions (feature extraction). `read_failures` counts
    unreadable files per reason (each retried on another sample); `TrainDataLoader` adds them to its stats.
    """

    video: torch.Tensor = tensor_field("B 3 T H W", torch.float32)   # pixels in [-1, 1]; images have T = 1
    latent_mask: torch.Tensor = tensor_field("B t h w", torch.float32)  # 1 on each sample's valid VAE-latent box
    text: Optional[Text] = None
    read_failures: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class I2VBatch(PixelBatch):
    """A pixel batch for image-to-video training: which frames are given and which generated."""

    frame_mask: torch.Tensor = tensor_field("B T", torch.float32)  # 1 = generate (padded frames too), 0 = given


@dataclass(frozen=True, kw_only=True)
class LatentBatch(_Contract):
    """VAE posteriors from the feature cache (VAE dtype), sampled and normalised at encoding like online clips."""

    mean: torch.Tensor = tensor_field("B Z t h w")
    logvar: torch.Tensor = tensor_field("B Z t h w")                # clamped as the VAE clamps it
    latent_mask: torch.Tensor = tensor_field("B t h w", torch.float32)
    shift: torch.Tensor = tensor_field("1 Z 1 1 1", torch.float32)  # the cache's latent normalisation
    scale: torch.Tensor = tensor_field("1 Z 1 1 1", torch.float32)
    text: Text
    read_failures: dict[str, int] = field(default_factory=dict)


Batch = Union[PixelBatch, I2VBatch, LatentBatch]


def stack_text(items: list[dict]) -> Optional[Text]:
    """The caption of collated items: cached features, token ids, or None (items without captions)."""
    first = items[0]

    def stack(key: str) -> Optional[torch.Tensor]:
        return torch.stack([it[key] for it in items]) if key in first else None

    if "text_hidden" in first:
        return TextFeatures(hidden=stack("text_hidden"), mask=stack("text_mask"), pooled=stack("text_pooled"))
    if "input_ids" in first:
        return TokenIds(input_ids=stack("input_ids"), attention_mask=stack("attention_mask"),
                        input_ids_2=stack("input_ids_2"), attention_mask_2=stack("attention_mask_2"))
    return None


def sum_read_failures(items: list[dict]) -> dict[str, int]:
    """Per-reason read failures of the items of one batch."""
    total: Counter = Counter()
    for it in items:
        total.update(it.get("read_failures", {}))
    return dict(total)


__all__ = ["Batch", "I2VBatch", "LatentBatch", "PixelBatch", "Text", "TextFeatures", "TokenIds", "stack_text",
           "sum_read_failures", "tensor_field"]
