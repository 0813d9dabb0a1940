"""`ae` block of the model/inference JSON: the WF-VAE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from .dtypes import Dtype
from .loader import require



@dataclass(frozen=True)
class AEConfig:
    latent_dim: int
    model_id: Literal["wfvae"] = "wfvae"
    base_channels: int = 128
    connect_res_layer_num: int = 2
    decoder_energy_flow_hidden_size: int = 128
    decoder_num_resblocks: int = 2
    dropout: float = 0.0
    encoder_energy_flow_hidden_size: int = 64
    encoder_num_resblocks: int = 2
    # The release JSON spells "dowmsample"; the key names are kept as users paste them.
    l1_dowmsample_block: str = "Spatial2xTime2x3DDownsample"
    l1_downsample_wavelet: str = "HaarWaveletTransform3D"
    l1_upsample_block: str = "Spatial2xTime2x3DUpsample"
    l1_upsample_wavelet: str = "InverseHaarWaveletTransform3D"
    l2_dowmsample_block: str = "Spatial2xTime2x3DDownsample"
    l2_downsample_wavelet: str = "HaarWaveletTransform3D"
    l2_upsample_block: str = "Spatial2xTime2x3DUpsample"
    l2_upsample_wavelet: str = "InverseHaarWaveletTransform3D"
    norm_type: Literal["layernorm", "groupnorm"] = "layernorm"
    scale: Optional[tuple[float, ...]] = None
    shift: Optional[tuple[float, ...]] = None
    t_interpolation: Literal["trilinear", "nearest"] = "trilinear"
    use_attention: bool = True
    use_tiling: bool = True
    # Chunked ("tiling") coding along time, exact for any value (memory grows with the chunk).
    # Latent frames per decoder chunk; 0 = decode in one pass.
    tile_latent_frames: int = 4
    # Latent frames per encoder chunk (8x as many pixel frames); 1 = the reference's 8 frames; 0 = one pass.
    encode_tile_latent_frames: int = 1
    vae_scale_factor: tuple[int, int, int] = (8, 8, 8)
    from_pretrained: Optional[str] = None
    dtype: Dtype = "fp32"

    # Ranges of the numeric keys (checked by `loader.from_dict`); cross-key rules are in `validate`.
    _ranges = {"latent_dim": "[1, 4096]", "base_channels": "[1, 65536]", "vae_scale_factor": "[1, 64]", "connect_res_layer_num": ">= 0", "encoder_num_resblocks": ">= 1",
               "decoder_num_resblocks": ">= 1", "encoder_energy_flow_hidden_size": ">= 1",
               "decoder_energy_flow_hidden_size": ">= 1", "dropout": "[0, 1)"}

    def validate(self, file, path: str) -> None:
        p = f"{path}." if path else ""
        require(self.base_channels >= 1, file, f"{p}base_channels", "must be >= 1")
        require(min(self.vae_scale_factor) >= 1, file, f"{p}vae_scale_factor", "every factor must be >= 1")
        for key in ("scale", "shift"):
            require(all(math.isfinite(x) for x in getattr(self, key) or ()), file, f"{p}{key}", "values must be finite")
            values = getattr(self, key)
            require(values is None or len(values) == self.latent_dim, file, f"{p}{key}",
                    f"needs latent_dim={self.latent_dim} values, got {0 if values is None else len(values)}")
        for key in ("tile_latent_frames", "encode_tile_latent_frames"):
            require(getattr(self, key) >= 0, file, f"{p}{key}", "must be >= 0 (0 = no chunking)")
