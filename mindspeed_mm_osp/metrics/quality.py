"""PSNR and SSIM of uint8 videos (T, H, W, 3), computed in float64 with torch (CPU or any device).

PSNR: one MSE over every pixel and channel of the clip, peak 255, so a clip with a few bad
frames is not averaged away; `inf` when the two clips are identical.

SSIM (Wang et al. 2004, the reference `ssim_index.m` constants): an 11x11 Gaussian window
with sigma 1.5 (normalised to sum 1), C1 = (0.01*255)^2, C2 = (0.03*255)^2, population
(biased) local variances, and only windows that lie fully inside the frame ("valid"; no
padding, no downsampling). By default it is computed on luminance, the full-range BT.601 Y
= 0.299 R + 0.587 G + 0.114 B kept in float (no rounding, no studio-range offset), per
frame; the clip's SSIM is the mean over frames. `channels="rgb"` averages the per-channel
SSIM of R, G and B instead.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
PEAK = 255.0
BT601 = (0.299, 0.587, 0.114)

SSIM_DEFINITION = (f"SSIM (Wang et al. 2004): Gaussian window {WINDOW}x{WINDOW}, sigma {SIGMA}, K1={K1}, K2={K2}, "
                   f"L={PEAK:g}, valid windows only; per frame on BT.601 luma Y=0.299R+0.587G+0.114B "
                   "(or per RGB channel, averaged), then averaged over frames")

Channels = Literal["y", "rgb"]


# Frames per float64 work chunk: ~2^22 pixels, so a 121-frame 1080p clip never lives in float64 at once.
_CHUNK_PIXELS = 1 << 22


def _as_video(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) or (H, W, 3) frames, got shape {tuple(t.shape)}")
    return t


def _pair(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_video(a), _as_video(b)
    if x.shape != y.shape:
        raise ValueError(f"videos differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def _chunks(x: torch.Tensor, y: torch.Tensor):
    step = max(1, _CHUNK_PIXELS // (x.shape[1] * x.shape[2]))
    for i in range(0, x.shape[0], step):
        yield x[i:i + step].to(torch.float64), y[i:i + step].to(torch.float64)


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR in dB of two uint8-range videos over all their pixels; `math.inf` when identical."""
    x, y = _pair(a, b)
    sse = sum(float(torch.sum((xc - yc) ** 2)) for xc, yc in _chunks(x, y))
    mse = sse / x.numel()
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK * PEAK / mse)


def luma_bt601(frames: torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB in [0, 255] -> (...) full-range BT.601 luma, float."""
    return frames @ torch.tensor(BT601, dtype=frames.dtype, device=frames.device)


def _gaussian_1d(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r = torch.arange(WINDOW, dtype=dtype, device=device) - (WINDOW - 1) / 2
    g = torch.exp(-(r * r) / (2 * SIGMA * SIGMA))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over the last two dims of (N, 1, H, W), valid region only."""
    x = F.conv2d(x, g.view(1, 1, WINDOW, 1))
    return F.conv2d(x, g.view(1, 1, 1, WINDOW))


def _ssim_planes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each (N, 1, H, W) float64 plane pair, shape (N,)."""
    g = _gaussian_1d(x.dtype, x.device)
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    var_x = _blur(x * x, g) - mu_x * mu_x
    var_y = _blur(y * y, g) - mu_y * mu_y
    cov = _blur(x * y, g) - mu_x * mu_y
    c1, c2 = (K1 * PEAK) ** 2, (K2 * PEAK) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def ssim_per_frame(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor,
                   channels: Channels = "y") -> np.ndarray:
    """SSIM of each frame pair (see module docstring), shape (T,), float64."""
    x, y = _pair(a, b)
    _, h, w, _ = x.shape
    if channels not in ("y", "rgb"):
        raise ValueError(f"channels must be 'y' or 'rgb', got {channels!r}")
    if min(h, w) < WINDOW:
        raise ValueError(f"SSIM needs frames of at least {WINDOW}x{WINDOW} pixels, got {h}x{w}")
    out = []
    for xc, yc in _chunks(x, y):
        n = xc.shape[0]
        if channels == "y":
            xp, yp = luma_bt601(xc)[:, None], luma_bt601(yc)[:, None]
        else:
            xp, yp = (v.permute(0, 3, 1, 2).reshape(n * 3, 1, h, w) for v in (xc, yc))
        out.append(_ssim_planes(xp, yp).reshape(n, -1).mean(dim=1))
    return torch.cat(out).cpu().numpy()


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, channels: Channels = "y") -> float:
    """Clip SSIM: the mean of `ssim_per_frame`."""
    return float(ssim_per_frame(a, b, channels).mean())
