"""Human sizes: parsing "512MB" / "1.5GiB" into bytes, and printing bytes back.

One convention, as `edgemoe --help` says: KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB powers of 1024.
A size is echoed in the kind of unit the user typed (format_size_like), so "--budget 8MB" comes back as 8.0 MB.
"""

from __future__ import annotations

import math
import numbers
import re

from .errors import EdgeMoEError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(value) -> int | None:
    """None/"none"/"unlimited" -> None; ints pass through; "512MB" -> 512_000_000; "1GiB" -> 1073741824."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise EdgeMoEError(f"cannot read size {value!r}; use e.g. 512MB, 1.5GB or 2GiB")
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):  # NaN compares false with everything; inf bytes is not a budget
            raise EdgeMoEError(f"memory budget must be a finite size, got {value!r} (None means unlimited)")
        if int(value) < 1:
            raise EdgeMoEError(f"memory budget must be positive, got {value!r}")
        return int(value)
    s = str(value).strip().lower()
    if s in ("none", "unlimited", "inf"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s)
    if not m:
        raise EdgeMoEError(f"cannot read size {value!r}; use e.g. 512MB, 1.5GB or 2GiB")
    if m.group(2) not in _UNITS:
        raise EdgeMoEError(f"cannot read size {value!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, TB (powers "
                           f"of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 512MB, 1.5GB or 2GiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise EdgeMoEError(f"memory budget must be positive, got {value!r}")
    return n


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_decimal_bytes(n: float) -> str:
    """Powers of 1000: 8000000 -> "8.0 MB", 10000 -> "10.0 KB"."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def is_decimal_size(typed) -> bool:
    """Whether a size as typed ("8MB", "1.5GiB", 1000000) uses powers of 1000 (plain numbers and B count as such)."""
    return not re.search(r"ib\s*$", str(typed).strip().lower())


def format_size_like(n: float, typed) -> str:
    """n bytes in the kind of unit `typed` used: "8MB" -> "8.0 MB", "2GiB" -> "2.0 GiB"; None -> binary units."""
    return format_decimal_bytes(n) if typed is not None and is_decimal_size(typed) else format_bytes(n)
