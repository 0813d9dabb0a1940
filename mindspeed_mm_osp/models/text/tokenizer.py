"""Tokenizers from local folders and fixed-length tokenisation for T5 (512) and CLIP (77)."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ...config.text import TokenizerConfig

T5_MAX_LENGTH = 512
CLIP_MAX_LENGTH = 77


def load_tokenizer(config: TokenizerConfig) -> PreTrainedTokenizerBase:
    """`AutoTokenizer` from the local folder in `config.from_pretrained`; never downloads.

    `hub_backend`, `autotokenizer_name` and `low_cpu_mem_usage` are accepted in the JSON
    for compatibility and have no effect (only "hf"/"AutoTokenizer" exist).
    """
    kwargs = {}
    if config.model_max_length is not None:
        kwargs["model_max_length"] = config.model_max_length
    return AutoTokenizer.from_pretrained(config.from_pretrained, local_files_only=True, **kwargs)


def tokenize(prompts: str | Sequence[str], tokenizer: PreTrainedTokenizerBase,
             max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), int64 (B, max_length): padded to `max_length`, truncated,
    special tokens added (T5's trailing `</s>`, CLIP's BOS/EOS).

    `max_length` is always explicit: a tokenizer without `model_max_length` reports ~1e30.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    out = tokenizer(list(prompts), max_length=max_length, padding="max_length", truncation=True,
                    return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
    return out["input_ids"].long(), out["attention_mask"].long()
