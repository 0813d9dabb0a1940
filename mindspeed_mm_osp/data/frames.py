"""Temporal plans: which source frames a video sample decodes (docs/data.md, "Frames").

Every video is resampled to `train_fps` by index decimation: candidates are
`start + floor(k·Δ)` with `Δ = fps / train_fps` (Δ = 1 within 0.1 fps), strictly inside
`[start, start + num_frames)`. An optional speed-up keeps evenly spaced candidates, a
random window of `num_frames` is taken, and the length is cut to the largest valid
`ae_stride_t·k + 1`. The startup filter and the reader use these same functions, so a
speed factor can no longer make them disagree (the reference applies it only at read time).
"""

from __future__ import annotations

import numpy as np


def resample_interval(fps, train_fps: float):
    """Δ between kept source frames (scalar or array); 1.0 when within 0.1 fps of the target."""
    fps = np.asarray(fps, dtype=np.float64)
    out = np.where(np.abs(fps - train_fps) < 0.1, 1.0, fps / train_fps)
    return float(out) if out.ndim == 0 else out


def num_candidates(num_frames, interval):
    """Number of resampled candidates `ceil(N / Δ)` (numpy `arange` length)."""
    return np.ceil(np.asarray(num_frames, dtype=np.float64) / interval).astype(np.int64)


def candidate_indices(start: int, num_frames: int, interval: float) -> np.ndarray:
    """Absolute source indices after resampling (never past the clip's last frame)."""
    k = np.arange(int(num_candidates(num_frames, interval)), dtype=np.float64)
    idx = start + np.floor(k * interval).astype(np.int64)
    return np.minimum(idx, start + num_frames - 1)


def speed_up_length(length, target: int, speed_factor: float):
    """Length after the speed-up (vectorised): `int(len / min(σ, len/F))` when σ > 1 and len > F."""
    length = np.asarray(length, dtype=np.int64)
    if speed_factor <= 1.0:
        return length
    m = length / target
    sped = (length / np.minimum(speed_factor, np.maximum(m, 1e-12))).astype(np.int64)
    return np.where(m > 1, sped, length)


def speed_up_positions(length: int, target: int, speed_factor: float) -> np.ndarray:
    """Positions (into the candidates) kept by the speed-up."""
    n = int(speed_up_length(length, target, speed_factor))
    if n == length:
        return np.arange(length)
    return np.linspace(0, length - 1, n).astype(np.int64)


def valid_frame_count(x, ae_stride_t: int, sp_size: int, min_frames: int):
    """Largest y ≤ x with y ≥ min_frames, (y−1) % a == 0 and the latent length a multiple of
    `sp_size`; −1 if none (vectorised `find_closest_y`)."""
    x = np.asarray(x, dtype=np.int64)
    latent = (np.maximum(x, 1) - 1) // ae_stride_t + 1
    latent = latent // sp_size * sp_size
    y = (latent - 1) * ae_stride_t + 1
    ok = (x >= min_frames) & (latent >= 1) & (y >= min_frames)
    out = np.where(ok, y, -1)
    return int(out) if out.ndim == 0 else out


def sample_frame_indices(start: int, num_frames: int, interval: float, target: int, length: int,
                         speed_factor: float, rng: np.random.Generator) -> np.ndarray:
    """The `length` source indices of one read: resample, speed up, random window of `target`.

    The window start is uniform over every possible position `[0, len − target]` (the reference
    never picks the last one; fixed here).
    """
    cand = candidate_indices(start, num_frames, interval)
    cand = cand[speed_up_positions(len(cand), target, speed_factor)]
    if len(cand) > target:
        b = int(rng.integers(0, len(cand) - target + 1))
        cand = cand[b:b + target]
    if len(cand) < length:
        raise ValueError(f"only {len(cand)} candidate frames for a {length}-frame sample")
    return cand[:length]


__all__ = ["candidate_indices", "num_candidates", "resample_interval", "sample_frame_indices",
           "speed_up_length", "speed_up_positions", "valid_frame_count"]
