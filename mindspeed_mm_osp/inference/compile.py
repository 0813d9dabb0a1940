"""`--compile`: torch.compile on each SparseUMMDiT block, with an eager fallback where the backend cannot compile.

Blocks, not the whole model: the code between blocks (embeddings, skip fusions, sequence-parallel scatter and
gather, the output head) stays eager, and a backend failure costs one block's trace. Dynamo builds one graph
per block (the guards are per module), so the first call pays for `num_blocks` compilations (inductor caches
them on disk for the next process). The compile is lazy: it happens on the first call,
and a `BackendCompilerFailed` there (no C++ compiler for inductor on CPU, an unsupported op on the device)
switches that block back to its eager forward for good, with one warning. Every rank hits the same failure on
the same call, so TP peers stay in step.

The default mode is the one measured fastest in `bench/bench_inference_accel.py` (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch._dynamo

from ..config.inference import COMPILE_MODES

logger = logging.getLogger(__name__)


class CompiledForward:
    """A module's forward through torch.compile until the backend fails, then its eager forward."""

    def __init__(self, module: torch.nn.Module, mode: str, backend: str | Callable = "inductor") -> None:
        self.name = type(module).__name__
        self.eager = module.forward
        self.compiled = torch.compile(self.eager, mode=None if mode == "default" else mode, backend=backend)

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            from torch._dynamo.exc import BackendCompilerFailed

            try:
                return self.compiled(*args, **kwargs)
            except BackendCompilerFailed as e:
                logger.warning("torch.compile failed for %s, running it eagerly: %s",
                               self.name, str(e).splitlines()[0])
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_blocks(model: torch.nn.Module, mode: str = "default",
                   backend: str | Callable = "inductor") -> list[CompiledForward]:
    """Replace the forward of every block of `model.blocks()` (in place); returns the wrappers. Raises dynamo's
    recompile limits (process-wide) so that every block gets its compiled graph."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    blocks = model.blocks()
    # Dynamo guards on the module, so every block is its own entry in the cache of the one `forward` code object;
    # past `recompile_limit` (8 by default) it would silently run the remaining blocks eagerly.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(blocks))
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * len(blocks))
    wrappers = []
    for block in blocks:
        wrapper = CompiledForward(block, mode, backend)
        block.forward = wrapper
        wrappers.append(wrapper)
    return wrappers


def compile_summary(wrappers: list[CompiledForward], seconds: float) -> str:
    """The report after the first step, which compiled every block: its time, and the blocks left eager."""
    eager = sum(not w.active for w in wrappers)
    fallback = f"; {eager} fell back to eager (see the warning above)" if eager else ""
    return f"compiled {len(wrappers)} blocks in {seconds:.1f} s (the first denoising step, compilation included){fallback}"


__all__ = ["COMPILE_MODES", "CompiledForward", "compile_blocks", "compile_summary"]
