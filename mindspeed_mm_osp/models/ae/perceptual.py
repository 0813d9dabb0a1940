"""LPIPS-style perceptual distance on a VGG-16-shaped backbone read from a local weights file.

Nothing is downloaded: the file (safetensors, or a torch file loaded weights-only) holds the backbone's convs
as `features.<i>.weight/.bias` (torchvision's VGG-16 numbering: stages of 2, 2, 3, 3, 3 convs) and one
non-negative 1x1 weight per stage as `lin<k>.weight` (`lin<k>.model.1.weight`, the LPIPS file's name, is
accepted too). Channel widths come from the file, so a narrow backbone works as well as VGG-16 itself.
docs/vae_training.md has the formula.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointKeyError, read_weights_file

STAGES = (2, 2, 3, 3, 3)  # convs per stage; a 2x2 max-pool precedes every stage but the first
# Input normalisation of the LPIPS backbone, for frames in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def conv_indices() -> list[list[int]]:
    """torchvision's `features.<i>` index of every conv, per stage (each conv is followed by a ReLU, each
    stage after the first preceded by a pool)."""
    out, i = [], 0
    for s, n in enumerate(STAGES):
        i += 1 if s else 0
        out.append([i + 2 * k for k in range(n)])
        i += 2 * n
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    state = read_weights_file(path)
    if not isinstance(state, dict):
        raise CheckpointKeyError(f"{path}: expected a state dict of the perceptual backbone")
    return {k.replace(".model.1.", "."): v for k, v in state.items() if torch.is_tensor(v)}


class PerceptualLoss(nn.Module):
    """d(x, y) = sum_k mean_hw( w_k . (f_k(x)/|f_k(x)| - f_k(y)/|f_k(y)|)^2 ) per frame; frozen."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path)
        state = _load(path)
        self.stages = nn.ModuleList()
        self.lins = nn.ParameterList()
        for k, indices in enumerate(conv_indices()):
            convs = nn.ModuleList()
            for i in indices:
                key = f"features.{i}"
                if f"{key}.weight" not in state:
                    raise CheckpointKeyError(f"{path}: no {key}.weight (expected a VGG-16 style backbone, "
                                             "docs/vae_training.md)")
                w = state[f"{key}.weight"]
                conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
                conv.load_state_dict({"weight": w, "bias": state.get(f"{key}.bias", torch.zeros(w.shape[0]))})
                convs.append(conv)
            self.stages.append(convs)
            lin = state.get(f"lin{k}.weight")
            if lin is None or lin.numel() != convs[-1].out_channels:
                raise CheckpointKeyError(f"{path}: lin{k}.weight must hold {convs[-1].out_channels} values")
            self.lins.append(nn.Parameter(lin.reshape(-1).float().clone(), requires_grad=False))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, feats = (x - self.shift) / self.scale, []
        for s, convs in enumerate(self.stages):
            if s:
                h = F.max_pool2d(h, 2, ceil_mode=True)
            for conv in convs:
                h = F.relu(conv(h))
            feats.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Frames (N, 3, H, W) in [-1, 1] -> (N,) distances."""
        total = x.new_zeros(x.shape[0])
        for fx, fy, w in zip(self._features(x), self._features(y), self.lins):
            total = total + ((fx - fy).pow(2) * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return total


__all__ = ["PerceptualLoss", "STAGES", "conv_indices"]
