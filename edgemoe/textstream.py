"""Generated token ids -> text pieces, with stop strings.

A piece is emitted only once it is final: an incomplete UTF-8 sequence (decoded as a trailing U+FFFD) is held back
until its last byte arrives, and so is any tail of the text that could be the beginning of a stop string, until the
next tokens show whether the stop string completes. When one does, the text ends just before it. So the pieces of a
stream always join to exactly the text a non-streaming call returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import EdgeMoEError

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that do not (yet) form a character
WINDOW, LOOKBACK = 64, 8  # tokens re-decoded per step: the recent window, plus a few before it for context


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """`stop` as given to generate() (None, a string, or a list of strings) -> a list of non-empty strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, bytes) or not isinstance(stop, Sequence):
        raise EdgeMoEError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    bad = [s for s in stop if not isinstance(s, str)]
    if bad:
        raise EdgeMoEError(f"stop must be a string or a list of strings, got an element {bad[0]!r}")
    return [s for s in stop if s]


class TextStream:
    """Feed token ids with push(); each call returns the newly final text ("" when everything new is held back).
    `stopped` turns true when a stop string completed; flush() returns the held-back rest at the end."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self._decode = decode
        self._stops = list(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._ids: list[int] = []
        self._text = ""
        # Decoding all ids at every step costs O(n) per token; instead the text of ids[:_start] is kept (_base) and
        # only ids[_start - LOOKBACK:] are decoded, minus the text of their first LOOKBACK tokens (_head): the
        # lookback gives decoders that treat a sequence's start specially (a leading-space strip) the same context.
        self._start, self._base, self._head = 0, "", ""
        self._emitted = 0  # characters of _text handed out
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            raise EdgeMoEError("TextStream: a stop string already ended the text")
        self._ids.append(int(token))
        self._text = self._decoded()
        # A stop string cannot start before _emitted: whatever could begin one was held back.
        hits = [i for i in (self._text.find(s, self._emitted) for s in self._stops) if i >= 0]
        end = min(hits) if hits else self._final_end()
        self.stopped = bool(hits)
        return self._emit(end)

    def flush(self) -> str:
        """The text held back at the end of generation (no stop string completed, so it is output)."""
        return "" if self.stopped else self._emit(len(self._text))

    def _decoded(self) -> str:
        """The text of all ids so far, decoding only the recent window."""
        ids, lookback = self._ids, max(0, self._start - LOOKBACK)
        window = self._decode(ids[lookback:])
        if not window.startswith(self._head):  # a decoder whose text is not prefix-stable: decode everything
            return self._decode(ids)
        text = self._base + window[len(self._head):]
        if len(ids) - self._start >= 2 * WINDOW:  # move the window on, at a character boundary
            start = len(ids) - WINDOW
            done = self._decode(ids[lookback:start])
            if done.startswith(self._head) and not done.endswith(REPLACEMENT):
                head = self._decode(ids[max(0, start - LOOKBACK):start])
                self._start, self._base, self._head = start, self._base + done[len(self._head):], head
        return text

    def _final_end(self) -> int:
        end = len(self._text)
        while end > self._emitted and self._text[end - 1] == REPLACEMENT:
            end -= 1
        for k in range(min(self._longest - 1, end - self._emitted), 0, -1):  # the longest tail a stop could begin with
            tail = self._text[end - k:end]
            if any(s.startswith(tail) for s in self._stops):
                return end - k
        return end

    def _emit(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        piece = self._text[self._emitted:end]
        self._emitted = end
        return piece
