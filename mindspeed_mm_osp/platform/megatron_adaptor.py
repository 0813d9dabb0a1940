"""Makes megatron-core 0.16 run where it expects CUDA.

On Ascend, `mindspeed.megatron_adaptor` (imported by `device.accelerator`) does this job.
On CPU (development, CI, the embedded demo) megatron-core's hard-coded CUDA calls are
routed to the CPU, in the same spirit:

1. `torch.cuda.current_device()` returns the CPU device (megatron allocates with
   `device=torch.cuda.current_device()` in ~175 places);
2. streams, events, synchronisation and cache calls become no-ops;
3. the "CUDA" RNG state (megatron's RNG tracker and recompute) is the CPU generator;
4. a TorchFunctionMode rewrites `device="cuda"`, `.cuda()` and `.to("cuda")` to the CPU
   and makes `Tensor.type()` report `torch.cuda.*` names, which megatron's optimizer
   asserts on. The mode is per thread: `adapt_megatron()` enters it for the calling thread.

Nothing here runs when a real accelerator is present.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

from .device import accelerator

_state = threading.local()
_patched = False


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Route megatron-core's hard-coded CUDA tensors to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # manual_seed_all stays: torch.manual_seed calls it, rerouting it recurses.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_rng_get
    mrandom._set_cuda_rng_state = _cpu_rng_set
    # It warns on every fork that the CPU RNG changed inside the "GPU" RNG context,
    # which on CPU is the same generator by construction.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


_CPU_NOISE = (
    r".*all_gather_into_tensor.? is deprecated.*",
    r".*reduce_scatter_tensor.? is deprecated.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed.*",
    r"Transformer Engine and Apex are not installed.*",
)


def quiet_cpu_warnings() -> None:
    """Warnings megatron-core raises on every step on CPU that say nothing about the run."""
    import warnings

    for pattern in _CPU_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def enter_cuda_to_cpu_mode() -> None:
    """Enter CudaToCpuMode for this thread (idempotent)."""
    if getattr(_state, "mode", None) is None:
        mode = CudaToCpuMode()
        mode.__enter__()
        _state.mode = mode


def adapt_megatron() -> None:
    """Prepare megatron-core for the current accelerator; call once per process (idempotent)."""
    global _patched
    if accelerator() != "cpu":
        return
    if not _patched:
        _patch_torch_cuda()
        _patch_megatron()
        quiet_cpu_warnings()
        _patched = True
    enter_cuda_to_cpu_mode()
