"""WF-VAE building blocks (tensor layout B, C, T, H, W everywhere).

Every module that looks along time is *streamable*: in chunked ("tiling") mode it keeps
the frames the next chunk needs in `cache`, so encoding/decoding a video chunk by chunk
is numerically identical to doing it in one pass (see `wfvae.py` for the chunk schedule).
Attribute names follow the release checkpoint (`conv`, `norm`, `q`, `h_conv`, ...), so
state-dict keys match `merged.ckpt` one to one.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

_Size3 = Union[int, tuple[int, int, int]]

# The release Haar filters use this rounded literal, not 1/(2*sqrt(2)) = 0.35355339...;
# the weights were trained with it, so inverse(forward(x)) = 8 * 0.3536**2 * x = 1.00026368 * x.
HAAR_CONSTANT = 0.3536
# Key stem -> (high-pass along T, along H, along W); the order is the band order of the coefficients.
HAAR_BANDS: dict[str, tuple[bool, bool, bool]] = {
    "h": (False, False, False),
    "g": (False, False, True),
    "hh": (False, True, False),
    "gh": (False, True, True),
    "h_v": (True, False, False),
    "g_v": (True, False, True),
    "hh_v": (True, True, False),
    "gh_v": (True, True, True),
}


def _triple(v: _Size3) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are normalised/activated/interpolated in fp32 (as the release does)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x.to(_compute_dtype(x.dtype))).to(x.dtype)


def haar_kernels() -> torch.Tensor:
    """The eight (2, 2, 2) Haar kernels, shape (8, 1, 2, 2, 2), indexed [t][h][w], band order of HAAR_BANDS."""
    sign = torch.tensor([1.0, -1.0])
    one = torch.ones(2)
    kernels = []
    for t_high, h_high, w_high in HAAR_BANDS.values():
        st, sh, sw = (sign if t_high else one), (sign if h_high else one), (sign if w_high else one)
        kernels.append(HAAR_CONSTANT * st[:, None, None] * sh[None, :, None] * sw[None, None, :])
    return torch.stack(kernels)[:, None]


class Streamable(nn.Module):
    """Per-module state for chunked processing; set by `wfvae.configure_streaming`.

    `time_rate` is the module's temporal rate relative to the latent (decoder: 1, 2 or 4),
    so a chunk carrying `n` latent look-ahead frames has `n * time_rate` of them here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.streaming = False
        self.first_chunk = True
        self.lookahead = 0
        self.time_rate = 1
        self.cache: Optional[torch.Tensor] = None


class CausalConv3d(Streamable):
    """3-D conv, causal in time: `kt - 1` frames are prepended (copies of frame 0, or the
    cached tail of the previous chunk); spatial zero padding as given."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Size3, stride: _Size3 = 1,
                 padding: _Size3 = 0, bias: bool = True) -> None:
        super().__init__()
        kernel, stride3, pad = _triple(kernel_size), _triple(stride), _triple(padding)
        self.kernel_t, self.stride_t = kernel[0], stride3[0]
        # Frames of the padded input the next chunk still needs (kt - st); chunks stay stride-aligned.
        self.cache_len = max(self.kernel_t - self.stride_t, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride3, (0, pad[1], pad[2]), bias=bias)

    def pad_time(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the causal prefix and, when streaming, remember the next chunk's prefix."""
        if self.kernel_t == 1:
            return x
        if self.streaming and not self.first_chunk:
            if self.cache_len and self.cache is None:
                raise RuntimeError("CausalConv3d: chunk after the first but no cached frames (streaming not reset?)")
            prefix = self.cache
        else:
            prefix = x[:, :, :1].expand(-1, -1, self.kernel_t - 1, -1, -1)
        if prefix is not None and prefix.shape[2]:
            x = torch.cat([prefix, x], dim=2)
        if self.streaming and self.cache_len:
            end = x.shape[2] - self.lookahead  # look-ahead frames are recomputed by the next chunk
            # A copy, not a view: a view would keep the whole chunk alive and void the memory bound.
            self.cache = x[:, :, end - self.cache_len:end].clone()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad_time(x))


class FrameConv2d(nn.Conv2d):
    """2-D conv applied to every frame independently (keys `weight`/`bias`, as released)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, _, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, -1, h, w))
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels only, at every (b, t, h, w) position; computed in >= fp32."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(x.dtype)
        y = F.layer_norm(x.to(dt).movedim(1, -1), self.norm.normalized_shape, self.norm.weight.to(dt),
                         self.norm.bias.to(dt), self.norm.eps)
        return y.movedim(-1, 1).to(x.dtype)


class ResnetBlock3D(nn.Module):
    """shortcut(x) + conv2(dropout(silu(norm2(conv1(silu(norm1(x))))))) with causal 3-D convs."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class ResnetBlock2D(nn.Module):
    """ResnetBlock3D's math with per-frame 2-D convs (encoder level 1; in == out there)."""

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels)
        self.conv1 = FrameConv2d(channels, channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm(channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = FrameConv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        return x + self.conv2(self.dropout(silu(self.norm2(h))))


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame (head_dim = channels), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, t, hh, ww = x.shape

        def tokens(y: torch.Tensor) -> torch.Tensor:
            return y.permute(0, 2, 3, 4, 1).reshape(b * t, 1, hh * ww, c)

        # Plain SDPA, not `models.attention`: head_dim = 4C = 640 exceeds Ascend's fused-kernel limit (512),
        # which is why the reference also uses a plain softmax attention here.
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.reshape(b, t, hh, ww, c).permute(0, 4, 1, 2, 3)
        return x + self.proj_out(out)


class Spatial2xTime2x3DDownsample(nn.Module):
    """Zero-pad H/W by one at the end, then a stride-2 causal 3-D conv (k3, no spatial padding)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Spatial2xTime2x3DUpsample(Streamable):
    """CachedCausal3DUpsample: frame 0 is upsampled in space only, frames 1.. in time (x2,
    `t_interpolation`) and space, then a causal k3 conv; 1 + 2(T-1) output frames.

    Chunked: the first chunk (frame 0) takes the space-only path; the second chunk has no
    cached frame and interpolates all its frames (frame 0 is never interpolated with frame 1
    in the full pass either); later chunks prepend the last non-look-ahead frame of the
    previous chunk and drop its two outputs. The path is chosen by the first-chunk flag, not
    by the chunk length (the reference keys it on length and crashes on 1-frame chunks).
    `depth` 0/1 = the lower/higher-resolution upsampler (time rate 1/2 of the decoder).
    """

    def __init__(self, in_channels: int, out_channels: int, t_interpolation: str = "trilinear", depth: int = 0) -> None:
        super().__init__()
        self.t_interpolation = t_interpolation
        self.depth = depth
        self.time_rate = 2 ** depth
        self.conv = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.conv.time_rate = 2 ** (depth + 1)

    @staticmethod
    def _space(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)

    def _time(self, x: torch.Tensor) -> torch.Tensor:
        align = False if self.t_interpolation in ("linear", "bilinear", "trilinear") else None
        mode = "trilinear" if align is not None else self.t_interpolation
        return F.interpolate(x, scale_factor=(2, 1, 1), mode=mode, align_corners=align)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(_compute_dtype(dtype))
        if self.streaming and not self.first_chunk:
            prev = self.cache
            inp = x if prev is None else torch.cat([prev, x], dim=2)
            n = inp.shape[2]
            if n > self.lookahead:
                self.cache = inp[:, :, n - self.lookahead - 1:n - self.lookahead].clone()
            up = self._time(inp)
            x = self._space(up if prev is None else up[:, :, 2:])
        elif x.shape[2] == 1 or self.streaming:
            x = self._space(x)
        else:
            x = torch.cat([self._space(x[:, :, :1]), self._space(self._time(x[:, :, 1:]))], dim=2)
        return self.conv(x.to(dtype))


class HaarWaveletTransform3D(Streamable):
    """Causal 3-D Haar analysis: (B, C, T, H, W) -> (B, 8C, (T+1)/2, H/2, W/2), band-major.

    Frame 0 is paired with a copy of itself (its T-high bands are 0), then (f1, f2), (f3, f4), ...
    The eight kernels are frozen parameters `<stem>_conv.conv.weight` (they are in the release
    state dict); the forward runs them as one grouped conv.
    """

    def __init__(self) -> None:
        super().__init__()
        kernels = haar_kernels()
        for i, stem in enumerate(HAAR_BANDS):
            conv = CausalConv3d(1, 1, 2, stride=2, bias=False)
            conv.conv.weight = nn.Parameter(kernels[i:i + 1].clone(), requires_grad=False)
            setattr(self, f"{stem}_conv", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.reshape(b * c, 1, t, h, w)
        if not self.streaming or self.first_chunk:
            y = torch.cat([y[:, :, :1], y], dim=2)
        weight = torch.cat([getattr(self, f"{stem}_conv").conv.weight for stem in HAAR_BANDS]).to(y.dtype)
        y = F.conv3d(y, weight, stride=2)
        return y.reshape(b, c, 8, *y.shape[2:]).transpose(1, 2).reshape(b, 8 * c, *y.shape[2:])


class InverseHaarWaveletTransform3D(Streamable):
    """Haar synthesis: (B, 8C, T, H, W) -> (B, C, 2T-1, 2H, 2W); the first output frame (the
    causal duplicate) is dropped unless this is a later chunk. Kernels are persistent buffers."""

    def __init__(self) -> None:
        super().__init__()
        kernels = haar_kernels()
        for i, stem in enumerate(HAAR_BANDS):
            self.register_buffer(stem, kernels[i:i + 1].clone(), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c8, t, h, w = x.shape
        c = c8 // 8
        # Band i of every channel -> output channel i of a stride-2 transposed conv, summed over bands.
        y = x.reshape(b, 8, c, t, h, w).transpose(1, 2).reshape(b * c, 8, t, h, w)
        weight = torch.cat([getattr(self, stem) for stem in HAAR_BANDS]).to(y.dtype)
        y = F.conv_transpose3d(y, weight, stride=2).reshape(b, c, 2 * t, 2 * h, 2 * w)
        if not self.streaming or self.first_chunk:
            y = y[:, :, 1:]
        return y
