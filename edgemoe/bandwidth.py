"""The machine's read bandwidths, measured: memory (what a decode matvec streams) and storage (what the expert cache
reads). One probe of each, used by `edgemoe fit` and the bench/ scripts alike."""

from __future__ import annotations

import mmap
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import EdgeMoEError

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

IO_ALIGN = 4096  # the C core's read alignment and cache slot granularity (native/src/io_thread.h EMOE_IO_ALIGN)


class MemoryReader:
    """numpy summing a float64 array of `nbytes` (make it larger than the last-level cache), split over `threads`
    threads (numpy releases the GIL): a streaming read that every machine's numpy does at close to its DRAM
    bandwidth. Each call reads the array once. A context manager (it owns the threads)."""

    def __init__(self, threads: int = 1, nbytes: int = 64 << 20):
        self.threads = max(1, int(threads))
        self.array = np.ones(nbytes // 8, dtype=np.float64)
        self.nbytes = self.array.nbytes
        self._parts = np.array_split(self.array, self.threads)
        self._ex = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def __call__(self) -> None:
        if self._ex:
            list(self._ex.map(np.sum, self._parts))
        else:
            self.array.sum()

    def close(self) -> None:
        if self._ex:
            self._ex.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def memory_read_bandwidth(threads: int = 1, nbytes: int = 64 << 20, reps: int = 3) -> dict:
    """Bytes/s of MemoryReader over `reps` reads: the best ("bytes_per_s") and the median."""
    times = []
    with MemoryReader(threads, nbytes) as read:
        for _ in range(reps):
            t0 = time.perf_counter()
            read()
            times.append(time.perf_counter() - t0)
    return {"bytes_per_s": read.nbytes / min(times), "median_bytes_per_s": read.nbytes / statistics.median(times),
            "bytes": read.nbytes, "threads": read.threads}


def storage_read_bandwidth(path: str | Path, pieces: list[tuple[int, int]], seconds: float = 0.6, threads: int = 2,
                           shuffle: bool = True) -> dict:
    """Bytes/s reading `pieces` ((offset, nbytes), e.g. the expert data) of `path`, in random order unless not
    `shuffle`, with `threads` readers (the engine's I/O threads), bypassing the page cache with O_DIRECT when the file
    system allows it, else after asking the kernel to drop the file's cached pages. Stops after `seconds` or when
    every piece was read."""
    path = str(path)
    order = list(pieces)
    if shuffle:
        random.Random(0).shuffle(order)
    direct = hasattr(os, "O_DIRECT")
    if direct:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            direct = False
    dropped = False
    if not direct and hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped = True
        except OSError:
            pass
        finally:
            os.close(fd)
    state = {"next": 0, "bytes": 0, "error": None}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    biggest = max((-(-(n + off % IO_ALIGN) // IO_ALIGN) * IO_ALIGN for off, n in order), default=IO_ALIGN)

    def reader():
        buf = mmap.mmap(-1, biggest)  # page-aligned, as O_DIRECT wants
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            while time.perf_counter() < deadline:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= len(order):
                    break
                off, n = order[i]
                start = off // IO_ALIGN * IO_ALIGN
                length = -(-(off + n - start) // IO_ALIGN) * IO_ALIGN
                got = os.preadv(fd, [memoryview(buf)[:length]], start)
                with lock:
                    state["bytes"] += got
        except OSError as e:
            state["error"] = e
        finally:
            os.close(fd)
            buf.close()

    t0 = time.perf_counter()
    workers = [threading.Thread(target=reader) for _ in range(max(1, threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    dt = time.perf_counter() - t0
    if state["error"] is not None and not state["bytes"]:
        raise EdgeMoEError(f"{path}: reading the file to measure its read bandwidth failed: {state['error']}")
    how = "O_DIRECT" if direct else ("page cache dropped" if dropped else "buffered (may be cached)")
    return {"bytes_per_s": state["bytes"] / dt if dt > 0 else 0.0, "bytes": state["bytes"], "seconds": dt,
            "method": how, "threads": max(1, threads)}
