"""Haar analysis/synthesis with the released constant 0.3536 (docs/model.md, "WF-VAE")."""

import pytest
import torch

from mindspeed_mm_osp.models.ae.modules import (
    HAAR_CONSTANT,
    HaarWaveletTransform3D,
    InverseHaarWaveletTransform3D,
    haar_kernels,
)

# The kernels are fp32 parameters/buffers (as released), so fp64 runs see fp32(0.3536).
KERNEL_VALUE = float(torch.tensor(HAAR_CONSTANT, dtype=torch.float32))
ROUND_TRIP_GAIN = 8 * KERNEL_VALUE**2  # 1.00026368, not 1: the constant is a rounded 1/(2*sqrt(2))


def test_round_trip_gain_value():
    assert 8 * HAAR_CONSTANT**2 == pytest.approx(1.00026368, abs=1e-12)
    assert ROUND_TRIP_GAIN == pytest.approx(1.0002636, abs=1e-7)


@pytest.mark.parametrize("frames", [1, 3, 9, 17])
def test_synthesis_of_analysis_is_gain_times_input(frames):
    x = torch.randn(2, 3, frames, 8, 12, dtype=torch.float64)
    coeffs = HaarWaveletTransform3D().double()(x)
    assert coeffs.shape == (2, 24, (frames + 1) // 2, 4, 6)
    y = InverseHaarWaveletTransform3D().double()(coeffs)
    torch.testing.assert_close(y, ROUND_TRIP_GAIN * x, rtol=0, atol=1e-12)


def test_band_major_channel_order_and_causal_first_frame():
    x = torch.randn(1, 3, 5, 4, 4, dtype=torch.float64)
    coeffs = HaarWaveletTransform3D().double()(x)
    # Channels 0..2 = low-pass band of R, G, B: 0.3536 * sum of each 2x2x2 block; frame 0 is paired with itself.
    padded = torch.cat([x[:, :, :1], x], dim=2)
    blocks = padded.reshape(1, 3, 3, 2, 2, 2, 2, 2).sum(dim=(3, 5, 7))
    torch.testing.assert_close(coeffs[:, :3], KERNEL_VALUE * blocks, rtol=0, atol=1e-12)
    # Band 4 (h_v, high along T) of channel c sits at index 4*3 + c and is 0 for the duplicated first frame.
    assert coeffs[:, 12:15, 0].abs().max() < 1e-15
    assert coeffs[:, 12:15, 1:].abs().max() > 0


def test_kernel_signs():
    k = haar_kernels()[:, 0] / HAAR_CONSTANT  # (8, t, h, w)
    sign = torch.tensor([1.0, -1.0])
    torch.testing.assert_close(k[0], torch.ones(2, 2, 2))  # h
    torch.testing.assert_close(k[1], sign.expand(2, 2, 2))  # g: high along W
    torch.testing.assert_close(k[2], sign[None, :, None].expand(2, 2, 2))  # hh: high along H
    torch.testing.assert_close(k[4], sign[:, None, None].expand(2, 2, 2))  # h_v: high along T
    torch.testing.assert_close(k[7], sign[:, None, None] * sign[None, :, None] * sign[None, None, :])  # gh_v
