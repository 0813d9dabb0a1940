"""A tiny random-init WF-VAE saved as a real checkpoint, for CPU tests and demos.

Same module tree and 252 key names as the release, 630,464 parameters; distinct widths
(Z=4, Ee=4, Ed=12) catch channel-slicing mix-ups.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ...config.ae import AEConfig
from ...config.loader import from_dict
from .checkpoint import save_released_checkpoint
from .wfvae import WFVAE

# First four channels of the release normalisation vectors: realistic, non-trivial values.
_TINY_SCALE = [0.7031, 0.7109, 1.5391, 1.2969]
_TINY_SHIFT = [-0.2129, 0.1226, 1.6328, 0.6211]


def tiny_ae_config_dict() -> dict[str, Any]:
    """The tiny config as an `ae` JSON block (set `from_pretrained` to a checkpoint path)."""
    return {
        "model_id": "wfvae",
        "base_channels": 8,
        "latent_dim": 4,
        "encoder_num_resblocks": 2,
        "decoder_num_resblocks": 2,
        "encoder_energy_flow_hidden_size": 4,
        "decoder_energy_flow_hidden_size": 12,
        "connect_res_layer_num": 1,
        "l1_dowmsample_block": "Spatial2xTime2x3DDownsample",
        "l1_downsample_wavelet": "HaarWaveletTransform3D",
        "l1_upsample_block": "Spatial2xTime2x3DUpsample",
        "l1_upsample_wavelet": "InverseHaarWaveletTransform3D",
        "l2_dowmsample_block": "Spatial2xTime2x3DDownsample",
        "l2_downsample_wavelet": "HaarWaveletTransform3D",
        "l2_upsample_block": "Spatial2xTime2x3DUpsample",
        "l2_upsample_wavelet": "InverseHaarWaveletTransform3D",
        "use_attention": True,
        "norm_type": "layernorm",
        "t_interpolation": "trilinear",
        "dropout": 0.0,
        "scale": list(_TINY_SCALE),
        "shift": list(_TINY_SHIFT),
        "use_tiling": True,
        "tile_latent_frames": 1,
        "encode_tile_latent_frames": 1,
        "vae_scale_factor": [8, 8, 8],
        "from_pretrained": None,
        "dtype": "fp32",
    }


def write_tiny_wfvae(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build a random-init tiny WF-VAE (global RNG untouched) and save `<out_dir>/merged.ckpt`.

    Layout as the release training checkpoints: `state_dict.gen_model` holds the full state
    dict, `ema_state_dict` the trainable parameters under DDP's `module.` prefix (no Haar
    constants), so loading it exercises the same path as the real `merged.ckpt`.
    """
    config = from_dict(AEConfig, tiny_ae_config_dict(), path="ae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WFVAE(config)
    ema = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return save_released_checkpoint(Path(out_dir) / "merged.ckpt", model.state_dict(), ema)
