"""`predictor` block of the model JSON: the SparseUMMDiT denoiser (text-to-video, or its image-to-video variant)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from .loader import require


@dataclass(frozen=True)
class PredictorConfig:
    num_layers: tuple[int, ...]
    sparse_n: tuple[int, ...]
    num_heads: int
    head_dim: int
    in_channels: int
    timestep_embed_dim: int
    caption_channels: int
    pooled_projection_dim: int
    # "SparseUMMDiTInpaint": the image-to-video / continuation variant (Open-Sora Plan 1.3 inpainting layout, see
    # `models.predictor.inpaint`): the input is [noisy latent, masked-video latent, latent mask] along channels.
    model_id: Literal["SparseUMMDiT", "SparseUMMDiTInpaint"] = "SparseUMMDiT"
    # Inpaint only: pixel frames per latent frame; the latent mask has this many channels (one per pixel frame).
    vae_scale_factor_t: int = 8
    out_channels: Optional[int] = None
    double_ff: bool = True
    sparse1d: bool = True
    skip_connection: bool = True
    # The release trains with zero-initialised skip fusion (the reference's default when the key is absent).
    skip_connection_zero_init: bool = True
    dropout: float = 0.0
    attention_bias: bool = True
    patch_size: int = 2
    patch_size_t: int = 1
    activation_fn: Literal["gelu-approximate", "gelu"] = "gelu-approximate"
    # Not read (loader.IGNORED_CONFIG_KEYS, like norm_cls): the release's LayerNorms are always affine.
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    norm_cls: Literal["layer_norm", "fp32_layer_norm"] = "layer_norm"
    interpolation_scale_t: float = 1.0
    interpolation_scale_h: float = 1.0
    interpolation_scale_w: float = 1.0
    from_pretrained: Optional[str] = None
    # The final block's text-stream parameters (attn1.to_add_out, norm2.norm_enc, ff_enc) exist in the reference
    # only when the model was built with TP>1, which the release was (docs/reference_bugs.md,
    # `tp-dependent-final-block`). They never change the video output. Build them when
    # the checkpoint to load has them (`models.predictor.has_final_block_text_params(state_dict)`).
    final_block_text_params: bool = False

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conditioned(self) -> bool:
        """True for the image-to-video (inpainting) variant."""
        return self.model_id == "SparseUMMDiTInpaint"

    @property
    def mask_channels(self) -> int:
        return self.vae_scale_factor_t if self.conditioned else 0

    @property
    def patch_embed_channels(self) -> int:
        """Input channels of `patch_embed`: in_channels (T2V) or 2*in_channels + vae_scale_factor_t (inpaint)."""
        return 2 * self.in_channels + self.mask_channels if self.conditioned else self.in_channels

    @property
    def output_channels(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    # Ranges of the numeric keys (checked by `loader.from_dict`); cross-key rules are in `validate`.
    _ranges = {"interpolation_scale_t": "> 0", "interpolation_scale_h": "> 0", "interpolation_scale_w": "> 0",
               "num_layers": "[1, 1024]", "sparse_n": "[1, 1024]", "num_heads": "[1, 1024]", "head_dim": "[16, 4096]",
               "in_channels": "[1, 4096]", "out_channels": "[1, 4096]", "timestep_embed_dim": "[1, 65536]",
               "caption_channels": "[1, 65536]", "pooled_projection_dim": "[1, 65536]", "patch_size": "[1, 64]",
               "vae_scale_factor_t": "[1, 64]"}

    def validate(self, file, path: str) -> None:
        p = f"{path}." if path else ""
        require(len(self.num_layers) == len(self.sparse_n), file, f"{p}sparse_n",
                f"needs one entry per stage: len(num_layers)={len(self.num_layers)} but len(sparse_n)={len(self.sparse_n)}")
        require(len(self.num_layers) % 2 == 1, file, f"{p}num_layers",
                f"the U-shape needs an odd number of stages (encoder, middle, decoder), got {len(self.num_layers)}")
        require(all(n > 0 for n in self.num_layers), file, f"{p}num_layers", "every stage needs at least one layer")
        require(all(k >= 1 for k in self.sparse_n), file, f"{p}sparse_n", "sparse_n values must be >= 1")
        half = len(self.num_layers) // 2
        require(tuple(self.num_layers[:half]) == tuple(reversed(self.num_layers[half + 1:])), file, f"{p}num_layers",
                f"encoder and decoder stages must mirror each other for the skip connections, got {list(self.num_layers)}")
        for key in ("in_channels", "timestep_embed_dim", "caption_channels", "pooled_projection_dim"):
            require(getattr(self, key) >= 1, file, f"{p}{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.out_channels is None or self.out_channels >= 1, file, f"{p}out_channels", "must be >= 1")
        require(0.0 <= self.dropout < 1.0, file, f"{p}dropout", f"must be in [0, 1), got {self.dropout}")
        require(math.isfinite(self.norm_eps) and self.norm_eps > 0, file, f"{p}norm_eps", "must be a finite number > 0")
        require(self.head_dim >= 16 and self.head_dim % 16 == 0, file, f"{p}head_dim",
                f"3-D RoPE splits head_dim into t/h/w parts of 4:6:6 sixteenths; use a multiple of 16, got {self.head_dim}")
        require(self.patch_size_t == 1, file, f"{p}patch_size_t",
                "only patch_size_t=1 is coherent in Open-Sora Plan v1.5 (temporal patching is not implemented by the release)")
        require(self.patch_size >= 1, file, f"{p}patch_size", "must be >= 1")
        require(self.num_heads >= 1, file, f"{p}num_heads", "must be >= 1")
        require(self.vae_scale_factor_t >= 1, file, f"{p}vae_scale_factor_t", "must be >= 1")

    def validate_parallel(self, tp: int, cp: int = 1, file=None, path: str = "predictor") -> None:
        """TP splits the heads; Ulysses CP splits each TP rank's heads again around attention."""
        sizes = f"--tensor-model-parallel-size={tp}"
        if cp > 1:
            sizes += f" x --context-parallel-size={cp} = {tp * cp}"
        require(self.num_heads % (tp * cp) == 0, file, f"{path}.num_heads",
                f"num_heads={self.num_heads} (num_heads*head_dim={self.hidden_size}) must be divisible by {sizes}; "
                "pick sizes whose product divides num_heads")


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recomputation of the predictor blocks (training only).

    * `granularity="full", method="block", num_layers=N`: the first N blocks (global order) are recomputed whole.
    * `selective_ffn_layers=N`: only the FFN half (adaLN-2, FFNs, gated residuals) of the first N blocks is
      recomputed; this is what the release trained with (N=32, all blocks).
    The two are mutually exclusive here (docs/reference_bugs.md, `recompute-modes-combined`).
    """

    granularity: Optional[Literal["full"]] = None
    method: Literal["block"] = "block"
    num_layers: int = 0
    selective_ffn_layers: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in (None, "full"):
            raise ValueError(f"recompute granularity must be None or 'full', got {self.granularity!r}")
        if self.method != "block":
            raise ValueError(f"recompute method must be 'block', got {self.method!r}")
        if self.num_layers < 0 or self.selective_ffn_layers < 0:
            raise ValueError("recompute num_layers and selective_ffn_layers must be >= 0")
        if self.granularity == "full" and self.num_layers == 0:
            raise ValueError("recompute granularity 'full' needs num_layers > 0 (how many blocks to recompute)")
        if self.granularity is None and self.num_layers > 0:
            raise ValueError("recompute num_layers > 0 needs granularity='full'")
        if self.granularity == "full" and self.selective_ffn_layers > 0:
            raise ValueError(
                "full-block recompute (granularity='full') and selective FFN recompute (selective_ffn_layers) are "
                "mutually exclusive; use one of them")

    def full_block(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` (1-based, global) is recomputed whole."""
        return self.granularity == "full" and layer_idx <= self.num_layers

    def ffn_only(self, layer_idx: int) -> bool:
        """Whether only the FFN half of block `layer_idx` (1-based, global) is recomputed."""
        return layer_idx <= self.selective_ffn_layers


def check_mask_channels(predictor: PredictorConfig, ae, file) -> None:
    """The inpaint variant folds each latent frame's pixel frames into mask channels: their count is the VAE's
    temporal factor."""
    if predictor.conditioned and ae is not None:
        require(predictor.vae_scale_factor_t == ae.vae_scale_factor[0], file, "predictor.vae_scale_factor_t",
                f"must equal ae.vae_scale_factor[0]={ae.vae_scale_factor[0]} (pixel frames per latent frame), "
                f"got {predictor.vae_scale_factor_t}")
