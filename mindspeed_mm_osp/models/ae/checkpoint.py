"""Load released WF-VAE weights (`merged.ckpt` and friends) strictly.

Precedence as the reference: a non-empty `ema_state_dict` (keys lose their DDP `module.`
prefix), else `state_dict["gen_model"]`, else `state_dict`, else the file is the state dict.
Unlike the reference (`strict=False` plus a print, leaving random weights on a mismatch), any
missing or unexpected key is an error that names the keys. Only the fixed Haar kernels may be
absent (EMA dicts hold trainable parameters only); they keep their constructor constants.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ...checkpoint.safe_load import UntrustedPickleError, load_torch_file
from ...errors import UserError
from ...io_atomic import atomic_write
from .modules import HaarWaveletTransform3D, InverseHaarWaveletTransform3D

logger = logging.getLogger(__name__)

_DDP_PREFIX = "module."


class CheckpointKeyError(UserError, ValueError):
    """The checkpoint's keys or shapes do not match the model."""


class LoadResult(NamedTuple):
    source: str  # "ema_state_dict", "state_dict.gen_model", "state_dict" or "raw"
    regenerated: tuple[str, ...]  # Haar constants absent from the file, kept from the constructor


def read_weights_file(path: Path) -> Any:
    """safetensors, or a torch file through the package's one pickle policy (weights only, no allow-list): a file
    that needs more is refused (`UntrustedPickleError`) unless named with --trust-pickle."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return load_torch_file(path, "WF-VAE checkpoint")
    except UntrustedPickleError:
        raise
    except Exception as exc:
        raise CheckpointKeyError(f"{path}: cannot read the WF-VAE checkpoint (truncated or corrupt file): "
                                 f"{type(exc).__name__}: {exc}") from exc


def _ema_disabled() -> bool:
    # The reference disables EMA for *any* value (even "0"); we read the value.
    return os.environ.get("NOT_USE_EMA_MODEL", "").strip().lower() in ("1", "true", "yes")


def select_state_dict(checkpoint: Any, prefer_ema: bool = True) -> tuple[str, dict[str, torch.Tensor]]:
    """Pick the generator weights out of any of the four layouts; strip DDP prefixes."""
    if not isinstance(checkpoint, dict):
        raise CheckpointKeyError(f"checkpoint is a {type(checkpoint).__name__}, expected a dict")
    ema = checkpoint.get("ema_state_dict")
    if prefer_ema and not _ema_disabled() and isinstance(ema, dict) and ema:
        source, state = "ema_state_dict", ema
    elif isinstance(checkpoint.get("state_dict"), dict):
        inner = checkpoint["state_dict"]
        if isinstance(inner.get("gen_model"), dict):
            source, state = "state_dict.gen_model", inner["gen_model"]
        else:
            source, state = "state_dict", inner
    else:
        source, state = "raw", checkpoint
    out = {}
    for key, value in state.items():
        while key.startswith(_DDP_PREFIX):
            key = key[len(_DDP_PREFIX):]
        out[key] = value
    return source, out


def _constant_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, (HaarWaveletTransform3D, InverseHaarWaveletTransform3D)):
            keys.update(f"{name}.{k}" if name else k for k in module.state_dict())
    return keys


def _names(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_wfvae_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                          prefer_ema: bool = True) -> LoadResult:
    """Load `path` (.ckpt/.pt/.pth pickle or .safetensors) into `model` (a `WFVAE`).

    With `strict` (default) any missing key other than the Haar constants, any unexpected
    key and any shape mismatch raises `CheckpointKeyError` naming the keys; with
    `strict=False` they are logged instead (shape mismatches always raise).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WF-VAE checkpoint not found: {path}")
    source, state = select_state_dict(read_weights_file(path), prefer_ema)
    expected = model.state_dict()
    constants = _constant_keys(model)
    missing = sorted(k for k in expected if k not in state and k not in constants)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                        for k, v in expected.items() if k in state and state[k].shape != v.shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_names(mismatched)}")
    if mismatched or (strict and problems):
        raise CheckpointKeyError(f"{path} ({source}) does not match the WF-VAE config: " + "; ".join(problems)
                                 + ". Check the `ae` config (base_channels, latent_dim, ...) against the checkpoint.")
    if problems:
        logger.warning("%s (%s): loading non-strictly: %s", path, source, "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    regenerated = tuple(sorted(constants - state.keys()))
    logger.info("loaded WF-VAE weights from %s (%s; %d Haar constants kept from code)", path, source, len(regenerated))
    return LoadResult(source, regenerated)


def save_released_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                             ema: dict[str, torch.Tensor], step: int = 0) -> Path:
    """Write weights in the release's training-checkpoint layout, atomically: `state_dict.gen_model` holds the
    full state dict, `ema_state_dict` the EMA of the trainable parameters under DDP's `module.` prefix (no Haar
    constants), so `load_wfvae_checkpoint` takes the EMA."""
    checkpoint = {
        "epoch": 0,
        "current_step": int(step),
        "state_dict": {"gen_model": {k: v.detach().cpu().clone() for k, v in state_dict.items()}},
        "ema_state_dict": {f"{_DDP_PREFIX}{k}": v.detach().cpu().float().clone() for k, v in ema.items()},
    }
    return atomic_write(Path(path), lambda f: torch.save(checkpoint, f))
