"""The only place that knows about accelerators.

Decides the device (NPU if `torch_npu` is installed, else CUDA, else CPU; `OSP_DEVICE`
overrides), the collective backend, the attention backend, RNG state and
synchronisation, and adapts megatron-core to run on CPU. Nothing outside this package
calls `torch.cuda` or imports `torch_npu`/`mindspeed`.
"""

from .device import (
    accelerator,
    attention_backend,
    device,
    device_count,
    device_name,
    dist_backend,
    empty_cache,
    get_accelerator_rng_state,
    host_copy,
    max_memory_allocated,
    npu_fused_ema_adamw,
    reset_peak_memory_stats,
    set_accelerator_rng_state,
    set_device,
    synchronize,
)
from .megatron_adaptor import adapt_megatron, quiet_cpu_warnings
from .quiet import silence_harmless_logs, silence_third_party

if accelerator() == "cpu":
    quiet_cpu_warnings()  # before megatron-core is first imported: its import-time notices say nothing on CPU
silence_harmless_logs()

__all__ = [
    "accelerator", "adapt_megatron", "attention_backend", "device", "device_count", "device_name", "dist_backend", "empty_cache",
    "get_accelerator_rng_state", "host_copy", "max_memory_allocated", "npu_fused_ema_adamw", "reset_peak_memory_stats",
    "set_accelerator_rng_state", "set_device", "silence_third_party", "synchronize",
]
