"""An export stopped by a signal leaves no partial file.

SIGINT already raises KeyboardInterrupt; SIGTERM (what `kill`, systemd and job schedulers send) and SIGHUP (a closed
terminal) by default end the process on the spot, before the container writer can remove OUT.tmp. Inside
`signals_raise()` they raise `edgemoe.errors.Terminated` instead, so the same cleanup runs as for Ctrl-C; the command
line then exits with one line and status 128 + signum (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from edgemoe.errors import Terminated

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _raise(signum, _frame):
    raise Terminated(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM / SIGHUP raise Terminated while the block runs (main thread only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
