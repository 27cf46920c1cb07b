"""The options of `edgemoe.load` / `Model`, checked in one place before anything is built from them.

Each bad value is one EdgeMoEError naming the option, the value and what is accepted -- never a bare ValueError from
deep inside (memory_budget=nan), a value accepted at load that fails at generate (max_ctx=-5), or a silent fallback
(threads=0 quietly running 1 thread).
"""

from __future__ import annotations

import numbers

from .errors import EdgeMoEError
from .units import parse_bytes

MAX_THREADS = 1024  # native/src/model.c refuses more compute threads
MAX_SEQ = 65536  # native/src/hebf.c refuses more KV-cache sequences
MODES = ("exact", "adaptive", "ondemand")
ENGINES = ("auto", "c", "numpy")


def _whole(name: str, value, lo: int, hi: int, hint: str = "") -> None:
    """None, or a whole number (an int or NumPy integer, not a bool or a float) in lo..hi."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= int(value) <= hi:
        raise EdgeMoEError(f"{name}={value!r}: expected a whole number in {lo}..{hi}{hint}")


def check_memory_budget(value) -> None:
    """None (unlimited), a positive finite number of bytes, or a size string ("1.5GB", "512MiB", "unlimited")."""
    if isinstance(value, bool) or not (value is None or isinstance(value, (str, numbers.Real))):
        raise EdgeMoEError(f"memory_budget={value!r}: expected a size such as 1.5GB or 2GiB, a number of bytes, or "
                           "None for unlimited")
    try:
        parse_bytes(value)
    except EdgeMoEError as e:
        raise EdgeMoEError(f"memory_budget={value!r}: {e}") from None


def check_load_options(spec, memory_budget=None, max_ctx=None, threads=None, n_seq=None, precision=None,
                       mode: str = "exact", engine: str = "auto") -> None:
    """Raise one EdgeMoEError for the first bad option; `spec` is the model's ArchSpec (for its context length)."""
    if engine not in ENGINES:
        raise EdgeMoEError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
    if mode not in MODES:
        raise EdgeMoEError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    check_memory_budget(memory_budget)
    _whole("max_ctx", max_ctx, 1, spec.max_position,
           f" (this model's context length is {spec.max_position} tokens; None = min({spec.max_position}, 4096))")
    _whole("threads", threads, 1, MAX_THREADS, " (None = 1)")
    _whole("n_seq", n_seq, 1, MAX_SEQ, " (None = 1)")
    if isinstance(precision, bool):  # True would pass for 1 plane
        raise EdgeMoEError(f"precision={precision!r}: expected a whole number of bit planes (None = all stored)")
    # its values (1..the planes the container stores) are Model._check_precision's, which knows the container
