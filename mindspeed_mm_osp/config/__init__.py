"""Typed configs built from the three JSON files, validated once at startup."""

from .ae import AEConfig
from .data import DataConfig, load_data_config
from .diffusion import DiffusionConfig
from .inference import AccelerationConfig, InferenceConfig, PipelineConfig, load_inference_config
from .loader import ConfigError, from_dict, read_json, to_dict
from .model import ModelConfig, load_model_config, validate_conditioning
from .predictor import PredictorConfig
from .text import TextEncoderConfig, TokenizerConfig

__all__ = [
    "AEConfig", "AccelerationConfig", "ConfigError", "DataConfig", "DiffusionConfig", "InferenceConfig", "ModelConfig",
    "PipelineConfig", "PredictorConfig", "TextEncoderConfig", "TokenizerConfig", "from_dict",
    "load_data_config", "load_inference_config", "load_model_config", "read_json", "to_dict", "validate_conditioning",
]
