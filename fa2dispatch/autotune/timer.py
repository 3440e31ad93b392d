"""Timers for the autotuner.

``CudaTimer`` (BENCH_PROTOCOL.md): warm-up calls, then each timed run between device events,
with the L2 cache flushed before every run (a 256 MiB write, larger than any current GPU's L2),
median of the runs. The spread is the interquartile range: a new winner must beat the
incumbent by more than it, so repeated tunes agree. ``WallTimer`` is the same on the host
clock for CPU tensors (the Triton interpreter), where it only orders configs for tests.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

MIN_RUNS = 20
WARMUP = 3
FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    spread: float  # interquartile range, ms
    runs: int

    def as_dict(self) -> dict:
        return {"ms": round(self.ms, 5), "spread": round(self.spread, 5), "runs": self.runs}


def summarize(samples: list[float]) -> Timing:
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Timing(statistics.median(samples), q3 - q1, len(samples))


class CudaTimer:
    """``clean_l2``: after the write flush, read another 256 MiB buffer. The write leaves up to
    an L2's worth of dirty lines (50 MB on an H100), whose write-back then competes with the
    timed kernel's first reads: a memory-bound kernel reading ~64 MiB (decode at B=1) measured
    about a third slower for it. The read writes them back before the timed run and leaves L2
    holding clean, unrelated lines (tools/bench_decode.py's "clean" times)."""

    def __init__(self, runs: int = MIN_RUNS, warmup: int = WARMUP, clean_l2: bool = False):
        import torch

        self.runs, self.warmup = max(runs, MIN_RUNS), warmup
        self._flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
        self._read = torch.ones(FLUSH_BYTES // 2, dtype=torch.float16, device="cuda") if clean_l2 else None

    def __call__(self, fn: Callable[[], object]) -> Timing:
        import torch

        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        for start, end in zip(starts, ends):
            self._flush.zero_()
            if self._read is not None:
                self._read.sum()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


class WallTimer:
    """Host clock; for CPU tensors (nothing runs asynchronously there)."""

    def __init__(self, runs: int = MIN_RUNS, warmup: int = 1):
        self.runs, self.warmup = runs, warmup

    def __call__(self, fn: Callable[[], object]) -> Timing:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.runs):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return summarize(samples)
