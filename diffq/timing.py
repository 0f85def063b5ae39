"""Latency and memory measurement: warm-up, repeats, median and spread, peak memory.

On CUDA times use events after a synchronize and memory is ``max_memory_allocated``; on CPU
times use ``perf_counter`` and memory is the process's peak resident set (a coarse upper bound:
the denoiser's own bytes are reported separately and are the number to compare there).
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @property
    def spread_s(self) -> float:
        return self.max_s - self.min_s


def time_call(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1, cuda: bool = False) -> Timing:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), len(times))


def peak_memory_bytes(cuda: bool = False) -> int:
    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak(cuda: bool = False) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def device_name() -> str:
    """The GPU's name, or the CPU and its torch thread count: the "where it ran" of a figure."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
