"""Per-stage timing of inference (text encoding, each denoising step, VAE decode) and the JSON report."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections import defaultdict
from typing import Iterator

from .. import platform


class StageTimer:
    """Wall-clock samples per stage; the accelerator is synchronised at both ends of every sample."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.enabled = True

    @contextlib.contextmanager
    def time(self, stage: str) -> Iterator[None]:
        platform.synchronize()
        start = time.perf_counter()
        yield
        platform.synchronize()
        if self.enabled:
            self.samples[stage].append(time.perf_counter() - start)

    def summary(self) -> dict[str, dict[str, float]]:
        return {stage: {"count": len(v), "mean_s": sum(v) / len(v), "min_s": min(v), "max_s": max(v),
                        "total_s": sum(v)} for stage, v in self.samples.items() if v}


def peak_memory() -> dict[str, int | str]:
    """Peak accelerator memory (bytes) on an accelerator, else the process's peak RSS (bytes)."""
    if platform.accelerator() != "cpu":
        return {"kind": f"{platform.accelerator()}_max_memory_allocated", "bytes": platform.max_memory_allocated()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"kind": "cpu_peak_rss", "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


__all__ = ["StageTimer", "peak_memory"]
