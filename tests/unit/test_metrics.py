"""PSNR/SSIM against an independent numpy reference (explicit 2-D window sums, no scipy)."""

import math

import numpy as np
import pytest

from mindspeed_mm_osp.metrics import psnr, ssim, ssim_per_frame
from helpers import psnr_reference, ssim_reference


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # Smooth content plus noise, so SSIM lands mid-range rather than near 0 or 1.
    yy, xx = np.mgrid[0:24, 0:40]
    base = (127 + 80 * np.sin(xx / 5.0 + yy / 7.0))[None, ..., None] + rng.normal(0, 10, (3, 24, 40, 3))
    a = np.clip(base, 0, 255).round().astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).round().astype(np.uint8)
    return a, b


@pytest.mark.parametrize("channels", ["y", "rgb"])
def test_ssim_matches_numpy_reference(pair, channels):
    a, b = pair
    got = ssim(a, b, channels)
    assert 0.2 < got < 0.95
    assert got == pytest.approx(ssim_reference(a, b, channels), abs=1e-10)
    per_frame = ssim_per_frame(a, b, channels)
    assert per_frame.shape == (3,)
    assert per_frame[1] == pytest.approx(ssim_reference(a[1:2], b[1:2], channels), abs=1e-10)


def test_psnr_matches_numpy_reference(pair):
    a, b = pair
    assert psnr(a, b) == pytest.approx(psnr_reference(a, b), abs=1e-10)


def test_identical_videos_give_ssim_one_and_infinite_psnr(pair):
    a, _ = pair
    assert psnr(a, a.copy()) == math.inf
    assert ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, a.copy(), "rgb") == pytest.approx(1.0, abs=1e-12)


def test_single_frame_and_bad_shapes(pair):
    a, b = pair
    assert ssim(a[0], b[0]) == pytest.approx(ssim_reference(a[:1], b[:1]), abs=1e-10)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, b[:, :, :-1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :10], b[:, :10])
