"""Text encoder and tokenizer blocks (`text_encoder`, `text_encoder_2`, `tokenizer_config*`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class TextEncoderConfig:
    from_pretrained: str
    model_id: Literal["T5", "CLIPWithProjection"] = "T5"
    hub_backend: Literal["hf"] = "hf"
    low_cpu_mem_usage: bool = False
    dtype: Optional[str] = None


@dataclass(frozen=True)
class TokenizerConfig:
    from_pretrained: str
    hub_backend: Literal["hf"] = "hf"
    autotokenizer_name: str = "AutoTokenizer"
    low_cpu_mem_usage: bool = False
    model_max_length: Optional[int] = None
