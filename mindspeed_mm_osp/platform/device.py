"""Accelerator selection and the few device calls the rest of the code needs."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Literal, Optional

import torch

Accelerator = Literal["npu", "cuda", "cpu"]


_chosen: list = []  # the accelerator, once chosen


def accelerator() -> Accelerator:
    """NPU when torch_npu imports, else CUDA when available, else CPU; chosen once per process.

    The choice is kept in a plain module list, not an `lru_cache`: the attention layers ask for it inside the
    blocks `--compile` traces, and dynamo does not trace through an `lru_cache` wrapper (it warns, then traces
    the wrapped body: environment lookups and imports on every compilation). `accelerator.cache_clear()`
    forgets the choice (tests that switch devices).
    """
    if not _chosen:
        _chosen.append(_choose())
    return _chosen[0]


accelerator.cache_clear = _chosen.clear  # type: ignore[attr-defined]


def _choose() -> Accelerator:
    """`OSP_DEVICE=cpu|cuda|npu` forces a choice (e.g. CPU runs on a GPU host). torch_npu is only looked up
    here, lazily, so importing the package never loads it."""
    forced = os.environ.get("OSP_DEVICE", "").strip().lower()
    if forced:
        if forced not in ("npu", "cuda", "cpu"):
            raise ValueError(f"OSP_DEVICE={forced!r}: expected one of npu, cuda, cpu")
        if forced == "npu":
            _import_npu()
        elif forced == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("OSP_DEVICE=cuda but torch.cuda.is_available() is False; unset OSP_DEVICE or fix the CUDA install")
        return forced  # type: ignore[return-value]
    if importlib.util.find_spec("torch_npu") is not None:
        _import_npu()
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _import_npu() -> None:
    importlib.import_module("torch_npu")
    if importlib.util.find_spec("mindspeed") is not None:
        # MindSpeed's adaptor patches megatron-core for Ascend (fused kernels, HCCL).
        importlib.import_module("mindspeed.megatron_adaptor")


def _module():
    """torch.cuda or torch.npu: same API surface for the calls below."""
    acc = accelerator()
    return getattr(torch, acc) if acc != "cpu" else None


def device(local_rank: Optional[int] = None) -> torch.device:
    acc = accelerator()
    if acc == "cpu":
        return torch.device("cpu")
    if local_rank is None:
        local_rank = _module().current_device()
    return torch.device(acc, local_rank)


def set_device(local_rank: int) -> None:
    mod = _module()
    if mod is not None:
        mod.set_device(local_rank)


def dist_backend() -> str:
    return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[accelerator()]


def attention_backend() -> Literal["npu_fusion", "sdpa"]:
    """Fused NPU attention kernel on Ascend; PyTorch SDPA (flash/mem-efficient/math) elsewhere."""
    return "npu_fusion" if accelerator() == "npu" else "sdpa"


def synchronize() -> None:
    mod = _module()
    if mod is not None:
        mod.synchronize()


def empty_cache() -> None:
    mod = _module()
    if mod is not None:
        mod.empty_cache()


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of `tensor`, in pinned (page-locked) memory when an accelerator is present, so that a
    checkpoint snapshot leaves the device at full copy speed."""
    tensor = tensor.detach()
    if _module() is None:
        return tensor.to("cpu", copy=True)
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)


def max_memory_allocated() -> int:
    """Peak accelerator memory in bytes since the last reset; 0 on CPU (benchmarks measure CPU memory themselves)."""
    mod = _module()
    return int(mod.max_memory_allocated()) if mod is not None else 0


def reset_peak_memory_stats() -> None:
    mod = _module()
    if mod is not None:
        mod.reset_peak_memory_stats()


def get_accelerator_rng_state() -> Optional[torch.Tensor]:
    mod = _module()
    return mod.get_rng_state() if mod is not None else None


def set_accelerator_rng_state(state: Optional[torch.Tensor]) -> None:
    mod = _module()
    if mod is not None and state is not None:
        mod.set_rng_state(state)


def npu_fused_ema_adamw():
    """MindSpeed's `npu_apply_fused_ema_adamw` op on Ascend when installed, else None (lazy import)."""
    if accelerator() != "npu" or importlib.util.find_spec("mindspeed") is None:
        return None
    try:
        module = importlib.import_module("mindspeed.ops.npu_apply_fused_ema_adamw")
    except ImportError:
        return None
    return getattr(module, "npu_apply_fused_ema_adamw", None)


def device_count() -> int:
    """Local accelerator count for launchers (CPU: 1 process unless told otherwise)."""
    mod = _module()
    return int(mod.device_count()) if mod is not None else 1


def device_name() -> str:
    """Human-readable accelerator name for logs and benchmark reports."""
    mod = _module()
    if mod is None:
        import platform as _host

        return _host.processor() or _host.machine()
    return str(mod.get_device_name())
