"""The model JSON of WF-VAE training (`pretrain.py --mm-model`, top level `"train_autoencoder": true`).

It holds the `ae` block (the architecture; `ae.from_pretrained` = 3-D weights to fine-tune from), an optional
`inflate_from` (a 2-D image WF-VAE checkpoint inflated into the causal 3-D kernels) and the `loss` block.
docs/vae_training.md explains every key and formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .ae import AEConfig
from .loader import check_path, from_dict, read_json, require

# The top-level key that makes `pretrain.py` train the autoencoder instead of the predictor.
SELECTOR_KEY = "train_autoencoder"


@dataclass(frozen=True)
class VAELossConfig:
    """Weights of the WF-VAE training objective (defaults: the WF-VAE release's training script)."""

    reconstruction: Literal["l1", "l2"] = "l1"
    reconstruction_weight: float = 1.0
    kl_weight: float = 1e-6
    wavelet_weight: float = 0.1
    perceptual_weight: float = 0.0
    perceptual_weights_path: Optional[str] = None
    discriminator_weight: float = 0.5
    discriminator_start: int = 2000
    discriminator_adaptive: bool = True
    discriminator_lr: Optional[float] = None
    discriminator_channels: int = 64
    discriminator_layers: int = 3

    _ranges = {"reconstruction_weight": "> 0", "kl_weight": ">= 0", "wavelet_weight": ">= 0",
               "perceptual_weight": ">= 0", "discriminator_weight": ">= 0", "discriminator_start": ">= 0",
               "discriminator_lr": "> 0", "discriminator_channels": "[1, 4096]", "discriminator_layers": "[1, 6]"}


@dataclass(frozen=True)
class VAETrainingConfig:
    ae: AEConfig
    train_autoencoder: bool = True
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    inflate_from: Optional[str] = None
    inflate_mode: Literal["tail", "average"] = "tail"

    def validate(self, file, path: str) -> None:
        require(self.train_autoencoder, file, SELECTOR_KEY, "must be true in a WF-VAE training config")
        require(not (self.inflate_from and self.ae.from_pretrained), file, "inflate_from",
                "set either inflate_from (2-D image weights) or ae.from_pretrained (3-D weights), not both")

    def check_paths(self, file) -> None:
        """The weight files the config names exist (ConfigError naming the key); called before anything is built."""
        check_path(file, "ae.from_pretrained", self.ae.from_pretrained, "file")
        check_path(file, "inflate_from", self.inflate_from, "file")
        check_path(file, "loss.perceptual_weights_path", self.loss.perceptual_weights_path, "file")


def is_vae_training_config(path: str | Path) -> bool:
    """Whether the model JSON at `path` asks for autoencoder training (its top level says so)."""
    return read_json(path).get(SELECTOR_KEY) is True


def load_vae_training_config(path: str | Path) -> VAETrainingConfig:
    return from_dict(VAETrainingConfig, read_json(path), file=str(path))


__all__ = ["SELECTOR_KEY", "VAELossConfig", "VAETrainingConfig", "is_vae_training_config",
           "load_vae_training_config"]
