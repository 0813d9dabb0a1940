"""The one step timer of the benchmarks: warm-up, then the median of synchronised wall times."""

from __future__ import annotations

import statistics
import time
from typing import Callable

from mindspeed_mm_osp import platform


def median_seconds(step: Callable[[], object], iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        platform.synchronize()
        t0 = time.perf_counter()
        step()
        platform.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
