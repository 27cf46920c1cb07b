"""The MWQ candidate search in C (`native/src/mwq_fit.c`), called per matrix with its rows split across threads.

`fit(W, gram, base_bits, n_planes, iters, group_size, threads)` returns what `mwq._fit_mwq` returns for the whole
matrix: (s1, m1, codes, [(scale, signs) per residual plane]). The C function releases the GIL (a ctypes call), so
threads fit disjoint row ranges of one matrix on all cores without copies.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgemoe import _native

_fit = _native._sig("emoe_mwq_fit", ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_void_p)

_pools: dict[int, ThreadPoolExecutor] = {}


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="mwq-fit")
    return _pools[threads]


def fit(W: np.ndarray, gram32: np.ndarray | None, base_bits: int, n_planes: int, iters: int, group_size: int,
        threads: int = 1, isa: int = _native.ISA_AUTO):
    """W [out, in] (any float dtype); gram32: [in / g, g, g] float32 normalized and damped blocks, or None."""
    W = np.ascontiguousarray(W, dtype=np.float32)
    out, in_ = W.shape
    ng = in_ // group_size
    G = None if gram32 is None else np.ascontiguousarray(gram32, dtype=np.float32)
    s1 = np.empty((out, ng), np.float32)
    m1 = np.empty((out, ng), np.float32)
    q = np.empty((out, in_), np.uint8)
    nres = max(n_planes - 1, 0)
    scales = np.empty((max(nres, 1), out, ng), np.float32)
    signs = np.empty((max(nres, 1), out, in_), np.uint8)

    def run(r0: int, r1: int) -> int:
        return _fit(W.ctypes.data, out, in_, r0, r1, group_size, None if G is None else G.ctypes.data, base_bits,
                    n_planes, iters, isa, s1.ctypes.data, m1.ctypes.data, q.ctypes.data, scales.ctypes.data,
                    signs.ctypes.data)

    threads = max(1, min(threads, out))
    bounds = np.linspace(0, out, threads + 1).round().astype(int)
    if threads == 1:
        statuses = [run(0, out)]
    else:
        statuses = list(_pool(threads).map(run, bounds[:-1], bounds[1:]))
    for st in statuses:
        _native._check(st, "emoe_mwq_fit")
    res = [(scales[k].astype(np.float64), signs[k].reshape(out, ng, group_size).astype(bool)) for k in range(nres)]
    return s1.astype(np.float64), m1.astype(np.float64), q.reshape(out, ng, group_size), res
