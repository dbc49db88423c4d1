"""Timing shared by the benchmarks: interleaved calls, median seconds per call."""
from __future__ import annotations

import statistics
import time


def time_interleaved(fns, steps: int, warmup: int = 1, sync=lambda: None) -> list[float]:
    """Median seconds per call of each fn, calls interleaved so that load changes on a shared
    machine hit every variant alike. ``sync`` waits for the device (e.g. torch.cuda.synchronize)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
