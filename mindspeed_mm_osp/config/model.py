"""The model JSON (`--mm-model`): frozen encoders, predictor and diffusion settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .ae import AEConfig
from .data import DataConfig
from .diffusion import DiffusionConfig
from .dtypes import Dtype
from .loader import check_path, from_dict, read_json, require
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
    # allow_tf32 and allow_internal_format are not read (loader.IGNORED_CONFIG_KEYS).
    allow_internal_format: bool = False
    load_video_features: bool = False
    load_text_features: bool = False
    enable_encoder_dp: bool = False
    weight_dtype: Dtype = "bf16"

    _ranges = {"frames": "[1, 100000]"}

    def validate(self, file, path: str) -> None:
        require(self.load_video_features or self.ae is not None, file, "ae",
                "the `ae` block is required unless load_video_features is true")
        require(self.load_text_features or self.text_encoder is not None, file, "text_encoder",
                "the `text_encoder` block is required unless load_text_features is true")
        if self.ae is not None:
            require(self.ae.latent_dim == self.predictor.in_channels, file, "predictor.in_channels",
                    f"must equal ae.latent_dim={self.ae.latent_dim}, got {self.predictor.in_channels}")
        check_mask_channels(self.predictor, self.ae, file)

    def check_paths(self, file) -> None:
        """The weights this config names exist and are of the right kind (ConfigError naming the key); the VAE and
        text encoders only where their features are not read from the cache (the predictor's weights are named by
        the weights reader, which also reads them). Called by the entry points before anything is built, not when
        the JSON is loaded."""
        if self.ae is not None and not self.load_video_features:
            check_path(file, "ae.from_pretrained", self.ae.from_pretrained, "file")
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self, name)
            if encoder is not None and not self.load_text_features:
                check_path(file, f"{name}.from_pretrained", encoder.from_pretrained, "dir")


def load_model_config(path: str | Path) -> ModelConfig:
    return from_dict(ModelConfig, read_json(path), file=str(path))


def validate_conditioning(model: ModelConfig, data: DataConfig, *, model_file, data_file,
                          loss_region: str = "all") -> None:
    """Image-to-video training needs a frame mask per sample (the data JSON's `mask_config`) and online clips: the
    masked clip is encoded with the clip, which the feature cache (clip posteriors only) cannot do. A loss region
    other than "all" (`--i2v-loss-region`) needs the image-to-video predictor."""
    conditioned, masks = model.predictor.conditioned, data.dataset_param.mask_config is not None
    require(conditioned or loss_region == "all", model_file, "predictor.model_id",
            f"--i2v-loss-region {loss_region} needs the image-to-video predictor \"SparseUMMDiTInpaint\", got "
            f"{model.predictor.model_id!r}")
    require(not conditioned or masks, data_file, "dataset_param.mask_config",
            f"the predictor is {model.predictor.model_id} (image-to-video): add a mask_config block (mask types and "
            "weights, see docs/i2v.md)")
    require(conditioned or not masks, data_file, "dataset_param.mask_config",
            f"given, but the predictor ({model.predictor.model_id}) takes no condition: set predictor.model_id "
            "\"SparseUMMDiTInpaint\" in the model JSON or remove mask_config")
    for key in ("load_video_features", "load_text_features"):
        require(not (conditioned and getattr(model, key)), model_file, key,
                "image-to-video training reads clips online (the masked clip is VAE-encoded with the clip; the "
                "feature cache stores clip posteriors only): set it to false")
