"""Memory figures the Linux kernel reports under /proc (None elsewhere, so callers can fall back or omit them)."""

from __future__ import annotations


def proc_bytes(path: str, key: str) -> int | None:
    """The `key:` line of a /proc file whose values are in KiB (e.g. /proc/self/status VmHWM), in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set now (VmRSS)."""
    return proc_bytes("/proc/self/status", "VmRSS")


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (VmHWM)."""
    return proc_bytes("/proc/self/status", "VmHWM")


def mem_available_bytes() -> int | None:
    """What the kernel estimates can be allocated without swapping (MemAvailable)."""
    return proc_bytes("/proc/meminfo", "MemAvailable")
