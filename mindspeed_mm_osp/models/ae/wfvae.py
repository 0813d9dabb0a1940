"""WF-VAE "Middle888" (8x8x8 compression) of Open-Sora Plan v1.5, with exact chunked coding.

Encoder: three causal Haar levels feed "energy-flow" side branches into the main path;
latent = (B, 2Z, (T-1)/8+1, H/8, W/8) posterior parameters. Decoder mirrors it with inverse
Haar transforms. Facts: docs/model.md, "WF-VAE" (keys: tests/unit/test_wfvae_keys.py).

Chunked ("tiling") coding processes time in chunks `[0,1], [1,1+n], [1+n,1+2n], ...` (frame 0
alone, as the model treats it as an image frame) with per-module caches, so memory scales
with the chunk, and the result equals the one-pass result for every frame count and chunk
size. Two reference defects are fixed here: (1) the reference adds the decoder's latent
look-ahead frame only when `end + 1 < T`, so the second-to-last chunk decodes wrongly when the
last chunk has one latent frame; we add it whenever `end < T`. (2) The reference upsampler
picks its space-only path by chunk length and crashes on 1-frame chunks after the first; ours
uses the first-chunk flag. Hence no automatic chunk-size search (which made 1- and 9-frame
videos impossible to tile and froze the video length after the first call) is needed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn

from ...config.ae import AEConfig
from .modules import (
    AttentionBlock,
    CausalConv3d,
    ChannelLayerNorm,
    FrameConv2d,
    HaarWaveletTransform3D,
    InverseHaarWaveletTransform3D,
    ResnetBlock2D,
    ResnetBlock3D,
    Spatial2xTime2x3DDownsample,
    Spatial2xTime2x3DUpsample,
    Streamable,
    silu,
)

TEMPORAL_FACTOR = 8  # pixel frames per latent frame (after the first) and output frames per decoded latent frame
SPATIAL_FACTOR = 8
_HAAR_CHANNELS = 24  # 8 bands x RGB

_SUPPORTED = {
    "l1_dowmsample_block": "Spatial2xTime2x3DDownsample",
    "l2_dowmsample_block": "Spatial2xTime2x3DDownsample",
    "l1_downsample_wavelet": "HaarWaveletTransform3D",
    "l2_downsample_wavelet": "HaarWaveletTransform3D",
    "l1_upsample_block": "Spatial2xTime2x3DUpsample",
    "l2_upsample_block": "Spatial2xTime2x3DUpsample",
    "l1_upsample_wavelet": "InverseHaarWaveletTransform3D",
    "l2_upsample_wavelet": "InverseHaarWaveletTransform3D",
    "norm_type": "layernorm",
}


def check_supported(config: AEConfig) -> None:
    """Only the 3-D/3-D layernorm variant exists in the release (the reference cannot build the 2-D one either)."""
    for key, value in _SUPPORTED.items():
        if getattr(config, key) != value:
            raise ValueError(f"ae.{key}={getattr(config, key)!r} is not supported; the v1.5 WF-VAE uses {value!r}")


def _set_time_rate(module: nn.Module, rate: int) -> None:
    for m in module.modules():
        if isinstance(m, CausalConv3d):
            m.time_rate = rate


class Encoder(nn.Module):
    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        c, ee = config.base_channels, config.encoder_energy_flow_hidden_size
        n, p = config.encoder_num_resblocks, config.dropout
        self.down1 = nn.Sequential(
            FrameConv2d(_HAAR_CHANNELS, c, 3, padding=1),
            *[ResnetBlock2D(c, p) for _ in range(n)],
            Spatial2xTime2x3DDownsample(c, c),
        )
        self.down2 = nn.Sequential(
            FrameConv2d(c + ee, 2 * c, 3, padding=1),
            *[ResnetBlock3D(2 * c, 2 * c, p) for _ in range(n)],
            Spatial2xTime2x3DDownsample(2 * c, 2 * c),
        )
        self.connect_l1 = FrameConv2d(_HAAR_CHANNELS, ee, 3, padding=1)
        self.connect_l2 = FrameConv2d(_HAAR_CHANNELS, ee, 3, padding=1)
        mid: list[nn.Module] = [ResnetBlock3D(2 * c + ee, 4 * c, p)]
        if config.use_attention:
            mid.append(AttentionBlock(4 * c))
        mid.append(ResnetBlock3D(4 * c, 4 * c, p))
        self.mid = nn.Sequential(*mid)
        self.norm_out = ChannelLayerNorm(4 * c)
        self.conv_out = CausalConv3d(4 * c, 2 * config.latent_dim, 3, padding=1)
        self.wavelet_transform_in = HaarWaveletTransform3D()
        self.wavelet_transform_l1 = HaarWaveletTransform3D()
        self.wavelet_transform_l2 = HaarWaveletTransform3D()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_coeffs(x)[0]

    def forward_with_coeffs(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Posterior parameters and the Haar coefficients of the input at levels 2 and 3 (what the decoder's
        energy-flow branches must reproduce: the wavelet loss of training)."""
        coeffs = self.wavelet_transform_in(x)
        l1_coeffs = self.wavelet_transform_l1(coeffs[:, :3])
        l2_coeffs = self.wavelet_transform_l2(l1_coeffs[:, :3])
        h = self.down1(coeffs)
        h = self.down2(torch.cat([h, self.connect_l1(l1_coeffs)], dim=1))
        h = self.mid(torch.cat([h, self.connect_l2(l2_coeffs)], dim=1))
        return self.conv_out(silu(self.norm_out(h))), (l1_coeffs, l2_coeffs)


class Decoder(nn.Module):
    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        c, ed = config.base_channels, config.decoder_energy_flow_hidden_size
        m, p = config.decoder_num_resblocks, config.dropout
        r, ti = config.connect_res_layer_num, config.t_interpolation
        self.energy_channels = ed
        self.conv_in = CausalConv3d(config.latent_dim, 4 * c, 3, padding=1)
        mid: list[nn.Module] = [ResnetBlock3D(4 * c, 4 * c, p)]
        if config.use_attention:
            mid.append(AttentionBlock(4 * c))
        mid.append(ResnetBlock3D(4 * c, 4 * c + ed, p))
        self.mid = nn.Sequential(*mid)
        self.up2 = nn.Sequential(
            *[ResnetBlock3D(4 * c, 4 * c, p) for _ in range(m)],
            Spatial2xTime2x3DUpsample(4 * c, 4 * c, ti, depth=0),
            ResnetBlock3D(4 * c, 4 * c + ed, p),
        )
        self.up1 = nn.Sequential(
            ResnetBlock3D(4 * c, 2 * c, p),
            *[ResnetBlock3D(2 * c, 2 * c, p) for _ in range(m - 1)],
            Spatial2xTime2x3DUpsample(2 * c, 2 * c, ti, depth=1),
            ResnetBlock3D(2 * c, 2 * c, p),
        )
        self.layer = nn.Sequential(ResnetBlock3D(2 * c, c, p), ResnetBlock3D(c, c, p))
        self.connect_l1 = nn.Sequential(*[ResnetBlock3D(ed, ed, p) for _ in range(r)],
                                        FrameConv2d(ed, _HAAR_CHANNELS, 3, padding=1))
        self.connect_l2 = nn.Sequential(*[ResnetBlock3D(ed, ed, p) for _ in range(r)],
                                        FrameConv2d(ed, _HAAR_CHANNELS, 3, padding=1))
        self.norm_out = ChannelLayerNorm(c)
        self.conv_out = FrameConv2d(c, _HAAR_CHANNELS, 3, padding=1)
        self.inverse_wavelet_transform_out = InverseHaarWaveletTransform3D()
        self.inverse_wavelet_transform_l1 = InverseHaarWaveletTransform3D()
        self.inverse_wavelet_transform_l2 = InverseHaarWaveletTransform3D()
        # Temporal rate of each causal conv relative to the latent: decides how many
        # look-ahead frames its chunk cache must skip (the upsamplers set their own).
        for module in (self.conv_in, self.mid, self.connect_l2, *self.up2[:m]):
            _set_time_rate(module, 1)
        for module in (self.up2[m + 1], self.connect_l1, *self.up1[:m]):
            _set_time_rate(module, 2)
        for module in (self.up1[m + 1], self.layer):
            _set_time_rate(module, 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_with_coeffs(z)[0]

    def forward_with_coeffs(self, z: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The video and the level-2 and level-3 Haar coefficients its energy-flow branches predict."""
        ed = self.energy_channels
        h = self.mid(self.conv_in(z))
        # The release uses the `_l1` inverse for level 2 and `_l2` for level 1; both are identical transforms.
        l2_coeffs = self.connect_l2(h[:, -ed:])
        l2 = self.inverse_wavelet_transform_l1(l2_coeffs)
        h = self.up2(h[:, :-ed])
        l1_coeffs = self.connect_l1(h[:, -ed:])
        l1_coeffs = torch.cat([l1_coeffs[:, :3] + l2, l1_coeffs[:, 3:]], dim=1)
        l1 = self.inverse_wavelet_transform_l2(l1_coeffs)
        h = self.layer(self.up1(h[:, :-ed]))
        h = self.conv_out(silu(self.norm_out(h)))
        return self.inverse_wavelet_transform_out(torch.cat([h[:, :3] + l1, h[:, 3:]], dim=1)), (l1_coeffs, l2_coeffs)


class TrainOutput(NamedTuple):
    """One training forward pass: reconstruction, posterior and the paired Haar coefficients."""

    reconstruction: torch.Tensor                   # (B, 3, T, H, W)
    mean: torch.Tensor                             # (B, Z, t, h, w)
    logvar: torch.Tensor                           # clamped as `split_posterior` does
    coeffs: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (input's, decoder's) at Haar levels 2 and 3


def configure_streaming(module: nn.Module, enabled: bool, first_chunk: bool = True, latent_lookahead: int = 0) -> None:
    """Set the chunk flags on every streamable submodule; disabling also drops all caches."""
    for m in module.modules():
        if isinstance(m, Streamable):
            m.streaming = enabled
            m.first_chunk = first_chunk
            m.lookahead = latent_lookahead * m.time_rate
            if not enabled:
                m.cache = None


@contextmanager
def _streaming(module: nn.Module) -> Iterator[None]:
    configure_streaming(module, False)
    try:
        yield
    finally:
        configure_streaming(module, False)


def chunk_spans(length: int, chunk: int) -> list[tuple[int, int]]:
    """[[0,1], [1,1+n], [1+n,1+2n], ...] clipped to `length` (frame 0 is always its own chunk)."""
    spans = [(0, min(1, length))]
    start = 1
    while start < length:
        spans.append((start, min(start + chunk, length)))
        start += chunk
    return spans


class WFVAE(nn.Module):
    """Encoder + decoder; state-dict keys `encoder.*` / `decoder.*` exactly as the release."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        check_supported(config)
        self.latent_dim = config.latent_dim
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> TrainOutput:
        """Training pass in one chunk: encode, sample the posterior with `noise` (the latent's shape), decode."""
        params, (enc_l1, enc_l2) = self.encoder.forward_with_coeffs(x)
        mean, logvar = split_posterior(params)
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        video, (dec_l1, dec_l2) = self.decoder.forward_with_coeffs(z)
        return TrainOutput(video, mean, logvar, ((enc_l1, dec_l1), (enc_l2, dec_l2)))

    def encode(self, x: torch.Tensor, chunk_latent_frames: int = 0) -> torch.Tensor:
        """Video (B, 3, T, H, W), T = 1 mod 8 -> posterior parameters (B, 2Z, (T-1)/8+1, H/8, W/8).

        `chunk_latent_frames` > 0 encodes `8 * chunk_latent_frames` pixel frames at a time
        (chunks stay aligned with every stride-2 stage, so no look-ahead is needed).
        """
        if chunk_latent_frames <= 0:
            return self.encoder(x)
        outputs = []
        with _streaming(self.encoder):
            for start, end in chunk_spans(x.shape[2], TEMPORAL_FACTOR * chunk_latent_frames):
                configure_streaming(self.encoder, True, first_chunk=start == 0)
                outputs.append(self.encoder(x[:, :, start:end]))
        return torch.cat(outputs, dim=2)

    def decode(self, z: torch.Tensor, chunk_latent_frames: int = 0) -> torch.Tensor:
        """Latent (B, Z, t, h, w) -> video (B, 3, 8t-7, 8h, 8w), nominally in [-1, 1] (not clamped).

        Chunked: the temporal x2 interpolations look one frame ahead, so every chunk but the
        first and the last also decodes the next latent frame and drops its 8 output frames;
        the caches skip those look-ahead frames.
        """
        if chunk_latent_frames <= 0:
            return self.decoder(z)
        length = z.shape[2]
        outputs = []
        with _streaming(self.decoder):
            for start, end in chunk_spans(length, chunk_latent_frames):
                lookahead = 1 if 0 < start and end < length else 0
                configure_streaming(self.decoder, True, first_chunk=start == 0, latent_lookahead=lookahead)
                y = self.decoder(z[:, :, start:end + lookahead])
                outputs.append(y[:, :, : y.shape[2] - TEMPORAL_FACTOR * lookahead])
        return torch.cat(outputs, dim=2)


def split_posterior(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2Z, ...) -> (mean, logvar) with logvar clamped to [-30, 20] as released."""
    mean, logvar = params.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """mean + exp(logvar / 2) * eps; eps from `generator` (drawn on its device) or the global RNG."""
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * eps
