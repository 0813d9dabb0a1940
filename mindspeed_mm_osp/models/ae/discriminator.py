"""3-D patch discriminator for WF-VAE training: one real/fake logit per space-time patch.

A stack of stride-2 3-D convs as in the WF-VAE release, with two deliberate differences: GroupNorm instead of
BatchNorm and no dropout, so a forward pass depends on its own sample only (no batch statistics, no random
mask) and data parallelism does not change the result.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int, stride, norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.GroupNorm(min(32, c_out), c_out))
    return layers + [nn.LeakyReLU(0.2)]


class PatchDiscriminator3D(nn.Module):
    """`layers` stride-2 stages (time is halved by the first two only), widths `channels * min(2^n, 8)`."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        seq = _block(in_channels, channels, 2, norm=False)
        width = channels
        for n in range(1, layers):
            nxt = channels * min(2 ** n, 8)
            seq += _block(width, nxt, (2 if n == 1 else 1, 2, 2), norm=True)
            width = nxt
        nxt = channels * min(2 ** layers, 8)
        seq += _block(width, nxt, 1, norm=True)
        seq.append(nn.Conv3d(nxt, 1, 3, padding=1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.main(video)


__all__ = ["PatchDiscriminator3D"]
