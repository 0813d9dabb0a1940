"""Frozen T5 and CLIP text encoders (docs/model.md, "Text encoders").

T5 v1.1 gives the token sequence the DiT cross-attends to (last hidden state, after the
final RMS norm, padding positions left as they are: the DiT gets the mask). CLIP-bigG gives
the pooled `text_embeds` (projection of the first EOS token, not L2-normalised). Both are
loaded by explicit class (`AutoModel` would build a full T5Model with a missing decoder),
from local folders only, and frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import CLIPTextModelWithProjection, PreTrainedModel, T5EncoderModel

from ...config.dtypes import to_torch_dtype
from ...config.text import TextEncoderConfig

_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "T5": T5EncoderModel,
    "CLIPWithProjection": CLIPTextModelWithProjection,
}



def load_text_encoder(config: TextEncoderConfig, dtype: str | torch.dtype | None = None) -> PreTrainedModel:
    """Load `config.from_pretrained` as the class named by `model_id`, frozen, in eval mode.

    `dtype` (the run's `weight_dtype`: bf16 in training, fp16 at inference) wins over
    `config.dtype`; fp32 if neither is set. transformers keeps T5's `wo` linears in fp32.
    """
    dtype = dtype if dtype is not None else (config.dtype or "fp32")
    model = _MODEL_CLASSES[config.model_id].from_pretrained(
        config.from_pretrained, local_files_only=True, dtype=to_torch_dtype(dtype))
    model.eval()
    model.requires_grad_(False)
    return model


class TextEncoders(nn.Module):
    """T5 (sequence + mask) and optional CLIP (pooled) behind one `encode` call.

    Not trained: `encode` runs without autograd, and `train()` keeps the models in eval
    mode so that dropout never switches on when the parent module is put in training mode.
    """

    def __init__(self, t5: PreTrainedModel, clip: Optional[PreTrainedModel] = None,
                 use_attention_mask: bool = True):
        super().__init__()
        self.t5 = t5
        self.clip = clip
        self.use_attention_mask = use_attention_mask
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, text_encoder: TextEncoderConfig, text_encoder_2: Optional[TextEncoderConfig] = None,
                    dtype: str | torch.dtype | None = None) -> "TextEncoders":
        clip = load_text_encoder(text_encoder_2, dtype) if text_encoder_2 is not None else None
        return cls(load_text_encoder(text_encoder, dtype), clip, text_encoder.use_attention_mask)

    def train(self, mode: bool = True) -> "TextEncoders":
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return self.t5.config.d_model

    @property
    def pooled_size(self) -> Optional[int]:
        return None if self.clip is None else self.clip.config.projection_dim

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               input_ids_2: Optional[torch.Tensor] = None, attention_mask_2: Optional[torch.Tensor] = None,
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Token ids (B, S) / (B, 77) -> hidden (B, S, C_cap), mask (B, S), pooled (B, P) or None.

        With `use_attention_mask` false the encoder sees no mask and the returned mask is all
        ones (the reference crashes in that case). `attention_mask_2` may be given or not:
        CLIP attention is causal and the pooled token is the first EOS, so padding after it
        cannot change the result (the reference passes no mask).
        """
        device = self.t5.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        if not self.use_attention_mask:
            attention_mask = torch.ones_like(attention_mask)
            hidden = self.t5(input_ids=input_ids).last_hidden_state
        else:
            hidden = self.t5(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = None
        if self.clip is not None:
            if input_ids_2 is None:
                raise ValueError("a CLIP encoder is configured: pass input_ids_2 (the CLIP token ids)")
            mask_2 = attention_mask_2.to(self.clip.device) if attention_mask_2 is not None else None
            pooled = self.clip(input_ids=input_ids_2.to(self.clip.device), attention_mask=mask_2).text_embeds
        return hidden, attention_mask, pooled
