"""Timing for normkit's Python benchmarks: interleave several implementations round-robin, one
sample of each per repetition, rotating the start so nobody always runs right after the same
neighbour (``rotated``), optionally sleeping between two samples so that threads left spinning by
one library have gone to sleep before the next one is timed.

- ``Entry`` / ``run_round_robin``: the harness's timing (calibrated batches, warm-up, priming, gap),
  used by bench_rows.py, bench_channels.py, bench_backward.py and bench_fused.py through _run.py.
- ``interleaved_medians``: the plain form (one sample function, no calibration) for the scripts that
  time their own way (bench_cuda.py with CUDA events, bench_layer_overhead.py).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import _libs


def rotated(items, r: int):
    """items in the order of repetition r: starting at item r % len(items), wrapping around."""
    start = r % len(items)
    return items[start:] + items[:start]


def interleaved_medians(fns, reps: int, sample) -> list:
    """reps rounds of sample(fn) for every fn of fns, each round in the order rotated(fns, round);
    the median of each fn's samples, in the order of fns."""
    samples = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(reps):
        for i in rotated(order, r):
            samples[i].append(sample(fns[i]))
    return [statistics.median(s) for s in samples]


@dataclass
class Entry:
    """One thing to time. ``fn`` is a call to time; or ``sampler(k)`` returns seconds per call."""

    name: str
    fn: Optional[Callable[[], object]] = None
    sampler: Optional[Callable[[int], float]] = None
    k: int = 1  # calls per sample (set by calibration)
    samples: list = field(default_factory=list)

    def sample(self, k: int) -> float:
        if self.sampler is not None:
            return self.sampler(k)
        fn = self.fn
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) / k

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median (noise indicator)."""
        s = sorted(self.samples)
        if len(s) < 4:
            return float("nan")
        q1, q3 = _libs.np.percentile(s, [25, 75])
        return (q3 - q1) / statistics.median(s)


def run_round_robin(entries, reps: int, warmup: int, sample_s: float, gap_s: float,
                    prime: bool = True, max_k: int = 2000) -> None:
    """Warm up and calibrate every entry, then take ``reps`` interleaved samples of each.

    gap_s: sleep after every sample, so that worker threads one library left spinning are asleep
    before the next one is timed. prime: make one untimed call right before every sample, so that
    the sample sees the library's own threads awake (as in a loop of calls) rather than paying for
    waking them (and, in a VM, an idle virtual CPU) -- about 0.4 ms measured here.
    """

    def pause():
        if gap_s > 0:
            time.sleep(gap_s)

    for e in entries:
        for _ in range(warmup):
            e.sample(1)
        t1 = min(e.sample(1) for _ in range(3))  # min: one preempted call must not decide the batch
        if t1 < sample_s:  # small problem: batch calls so that a sample lasts about sample_s
            t1 = min(t1, e.sample(8))
            e.k = int(max(1, min(max_k, math.ceil(sample_s / max(t1, 1e-9)))))
        else:
            e.k = 1
        e.samples = []
        pause()
    for r in range(reps):
        for e in rotated(entries, r):
            if prime:
                e.sample(1)
            e.samples.append(e.sample(e.k))
            pause()
