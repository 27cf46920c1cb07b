"""BLAS threading for many small products.

A multithreaded BLAS spends more time syncing than computing on small products (the MWQ fit's [rows, g] @ [g, g],
calibration's Gram blocks [g, n] @ [n, g]): measured 16x slower on a busy 2-core machine for the fit, and ~10x the
CPU time for the Gram blocks of a calibrated OLMoE layer (its BLAS threads spin while the other core is taken).
threadpoolctl (an exporter dependency), when installed, pins BLAS to one thread inside `one_blas_thread()`.
"""

from __future__ import annotations

import contextlib
import functools


@functools.cache
def _controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()  # inspects the loaded libraries once; limiting is then cheap


def one_blas_thread():
    """A context in which BLAS runs on one thread (no-op without threadpoolctl)."""
    c = _controller()
    return contextlib.nullcontext() if c is None else c.limit(limits=1, user_api="blas")
