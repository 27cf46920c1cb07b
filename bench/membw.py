"""The memory read bandwidth the benchmarks compare kernels and decode against: numpy summing 1 GiB, split over
`threads` threads, best of 5 (a streaming read that every machine's numpy does at close to its DRAM bandwidth)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def read_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """GB/s."""
    a = np.ones(nbytes // 8)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(reps):
            t0 = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9
