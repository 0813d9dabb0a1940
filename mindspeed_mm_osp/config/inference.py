"""The inference JSON (`inference_t2v_model1_5.json`)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .ae import AEConfig
from .diffusion import DiffusionConfig
from .dtypes import Dtype
from .loader import check_path, from_dict, read_json, require
from .predictor import PredictorConfig, check_mask_channels
from .text import TextEncoderConfig, TokenizerConfig


@dataclass(frozen=True)
class PipelineConfig:
    input_size: tuple[int, int, int] = (121, 576, 1024)
    use_attention_mask: bool = True
    version: str = "v1.5"
    model_type: Literal["t2v"] = "t2v"

    _ranges = {"input_size": "[1, 100000]"}

    def validate(self, file, path: str) -> None:
        frames, height, width = self.input_size
        require(frames >= 1 and (frames - 1) % 8 == 0, file, f"{path}.input_size[0]",
                f"frames must be 8k+1 for the 8x temporal VAE stride, got {frames} (nearest: {((frames - 1) // 8) * 8 + 1})")
        require(height >= 16 and width >= 16 and height % 16 == 0 and width % 16 == 0, file, f"{path}.input_size",
                f"height and width must be multiples of 16 (VAE stride 8 x patch 2), got {height}x{width}")


CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)


@dataclass(frozen=True)
class AccelerationConfig:
    """`acceleration` block (docs/inference_acceleration.md); every option off by default (the exact sampler).

    cfg_parallel: uncond/cond branches on two rank groups (needs an even world size / TP);
    cache_threshold: TeaCache-style step cache, skip the blocks while the accumulated relative change of the
    first block's modulated input stays under it (null = off; 0 = through the cache path, never skips);
    compile / compile_mode: torch.compile each predictor block;
    parallel_vae_decode: spread the VAE decode's latent frames over the replica's ranks.
    """

    cfg_parallel: bool = False
    cache_threshold: Optional[float] = None
    compile: bool = False
    compile_mode: CompileMode = "default"
    parallel_vae_decode: bool = False

    def validate(self, file, path: str) -> None:
        require(self.cache_threshold is None or self.cache_threshold >= 0, file, f"{path}.cache_threshold",
                f"must be >= 0 or null (off), got {self.cache_threshold}")


@dataclass(frozen=True)
class InferenceConfig:
    ae: AEConfig
    text_encoder: TextEncoderConfig
    tokenizer: TokenizerConfig
    predictor: PredictorConfig
    text_encoder_2: Optional[TextEncoderConfig] = None
    tokenizer_2: Optional[TokenizerConfig] = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pipeline_config: PipelineConfig = field(default_factory=PipelineConfig)
    acceleration: AccelerationConfig = field(default_factory=AccelerationConfig)
    micro_batch_size: int = 1
    frame_interval: int = 1
    model_max_length: int = 512
    save_path: str = "./opensoraplan_samples"
    fps: int = 24
    prompt: str = "./examples/opensoraplan1.5/sora.txt"
    negative_prompt: Optional[str] = None
    seed: int = 42
    device: str = "auto"
    weight_dtype: Dtype = "fp16"

    # Ranges of the numeric keys (checked by `loader.from_dict`); cross-key rules are in `validate`.
    _ranges = {"micro_batch_size": "[1, 1024]", "frame_interval": ">= 1", "model_max_length": ">= 1",
               "fps": "[1, 1000]", "seed": "[0, 4294967295]"}

    @property
    def output_fps(self) -> int:
        """The fps videos are written at: the source fps over the frame sampling interval."""
        return self.fps // self.frame_interval

    def validate(self, file, path: str) -> None:
        require(self.micro_batch_size >= 1, file, "micro_batch_size", "must be >= 1")
        require(self.fps >= 1, file, "fps", "must be >= 1")
        require(self.model_max_length >= 1, file, "model_max_length", "must be >= 1")
        require(self.frame_interval >= 1, file, "frame_interval", "must be >= 1")
        require(self.ae.latent_dim == self.predictor.in_channels, file, "predictor.in_channels",
                f"must equal ae.latent_dim={self.ae.latent_dim}, got {self.predictor.in_channels}")
        check_mask_channels(self.predictor, self.ae, file)

    def check_paths(self, file, *, text: bool = True, vae: bool = True) -> None:
        """The weights and tokenizers this config names exist and are of the right kind (ConfigError naming the
        key): the text side (`text`, for sampling) and the VAE (`vae`, for decoding). Called by the entry point
        before anything is built; the predictor weights are checked where `--predictor-weights` may replace them."""
        if vae:
            check_path(file, "ae.from_pretrained", self.ae.from_pretrained, "file")
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            block = getattr(self, name)
            if text and block is not None:
                check_path(file, f"{name}.from_pretrained", block.from_pretrained, "dir")


def load_inference_config(path: str | Path) -> InferenceConfig:
    return from_dict(InferenceConfig, read_json(path), file=str(path))
