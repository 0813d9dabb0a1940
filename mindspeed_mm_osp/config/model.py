"""The model JSON (`--mm-model`): frozen encoders, predictor and diffusion settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .ae import AEConfig
from .diffusion import DiffusionConfig
from .dtypes import Dtype
from .loader import from_dict, read_json, require
from .predictor import PredictorConfig, check_mask_channels
from .text import TextEncoderConfig


@dataclass(frozen=True)
class ModelConfig:
    predictor: PredictorConfig
    ae: Optional[AEConfig] = None
    text_encoder: Optional[TextEncoderConfig] = None
    text_encoder_2: Optional[TextEncoderConfig] = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    frames: Optional[int] = None
    allow_tf32: bool = False
    # Ascend-only switch (NPU private formats); accepted, no effect elsewhere.
    allow_internal_format: bool = False
    load_video_features: bool = False
    load_text_features: bool = False
    enable_encoder_dp: bool = False
    weight_dtype: Dtype = "bf16"

    def validate(self, file, path: str) -> None:
        require(self.load_video_features or self.ae is not None, file, "ae",
                "the `ae` block is required unless load_video_features is true")
        require(self.load_text_features or self.text_encoder is not None, file, "text_encoder",
                "the `text_encoder` block is required unless load_text_features is true")
        if self.ae is not None:
            require(self.ae.latent_dim == self.predictor.in_channels, file, "predictor.in_channels",
                    f"must equal ae.latent_dim={self.ae.latent_dim}, got {self.predictor.in_channels}")
        check_mask_channels(self.predictor, self.ae, file)


def load_model_config(path: str | Path) -> ModelConfig:
    return from_dict(ModelConfig, read_json(path), file=str(path))
