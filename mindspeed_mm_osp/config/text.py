"""Text encoder and tokenizer blocks (`text_encoder`, `text_encoder_2`, `tokenizer_config*`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .dtypes import Dtype
from .loader import require


@dataclass(frozen=True)
class TextEncoderConfig:
    """A frozen transformers text model loaded from a local folder.

    `model_id` picks the class: "T5" -> T5EncoderModel, "CLIPWithProjection" ->
    CLIPTextModelWithProjection. `dtype` is used when the caller gives no `weight_dtype`.
    `use_attention_mask` (T5 only) feeds the tokenizer mask to the encoder.
    `hub_backend` and `low_cpu_mem_usage` are accepted and not read (`loader.IGNORED_CONFIG_KEYS`).
    """

    from_pretrained: str
    model_id: Literal["T5", "CLIPWithProjection"] = "T5"
    hub_backend: Literal["hf"] = "hf"
    low_cpu_mem_usage: bool = False
    dtype: Optional[Dtype] = None
    use_attention_mask: bool = True

    def validate(self, file, path: str) -> None:
        require(bool(self.from_pretrained), file, f"{path}.from_pretrained" if path else "from_pretrained",
                "must name a local folder with config.json and the weights")


@dataclass(frozen=True)
class TokenizerConfig:
    from_pretrained: str
    hub_backend: Literal["hf"] = "hf"
    autotokenizer_name: Literal["AutoTokenizer"] = "AutoTokenizer"
    low_cpu_mem_usage: bool = False
    model_max_length: Optional[int] = None

    def validate(self, file, path: str) -> None:
        p = f"{path}." if path else ""
        require(bool(self.from_pretrained), file, f"{p}from_pretrained", "must name a local tokenizer folder")
        require(self.model_max_length is None or self.model_max_length >= 1, file, f"{p}model_max_length",
                "must be >= 1")
