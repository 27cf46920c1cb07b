"""Progress of a long command on stderr (the device install carries no tqdm): one line rewritten in place on a
terminal, otherwise a line at each further tenth; nothing with -q."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, what: str, total: int, unit: str = "tokens", quiet: bool = False):
        self.what, self.total, self.unit, self.quiet = what, max(int(total), 1), unit, quiet
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._tenth = -1

    def update(self, done: int) -> None:
        if self.quiet:
            return
        frac = min(done / self.total, 1.0)
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        line = f"{self.what}: {done}/{self.total} {self.unit} ({frac:.0%}, {rate:.0f} {self.unit}/s)"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif int(frac * 10) > self._tenth:
            self._tenth = int(frac * 10)
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.quiet and self.tty:
            print(file=sys.stderr, flush=True)
