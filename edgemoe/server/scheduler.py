"""Continuous batching over the model's n_seq sequence slots.

One worker thread owns the model (no other thread calls it while serving). Each turn it admits waiting requests
into free slots (a request joins at the next step: its prompt is prefilled in its slot) and then runs one decode step
for every running request together (CEngine.decode_batch: an expert chosen by several sequences is loaded and run
once for all). A request leaves its slot when it finishes or is cancelled (client gone), and the next waiting one
takes it. The slot a request gets is the free one whose KV cache shares the longest prefix with its prompt, so a
client continuing a conversation reuses the earlier turns' keys and values (only the rest is prefilled).

Engine calls used (edgemoe/engine_c.py, all per slot): Model._prefill_reusing_cache(ids, slot) (truncate + extend,
or prefill), CEngine.decode_batch(tokens, slots), CEngine.seq_cached_ids(slot), CEngine.reset(slot), CEngine.n_seq.
An engine without decode_batch (the NumPy engine) serves one request at a time through decode(token).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from .sequence import Decoding, Sequence


class QueueFull(Exception):
    """More requests are waiting than the queue holds (HTTP 503)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests (HTTP 503)."""


class Job:
    """A request for the scheduler. emit(kind, value) is called from the worker thread: ("text", str) for each new
    piece of text, then exactly one ("done", finish_reason) or ("error", message)."""

    def __init__(self, ids: list[int], decoding: Decoding, emit: Callable[[str, object], None], constraint=None):
        self.ids, self.decoding, self.emit, self.constraint = ids, decoding, emit, constraint
        self.cancelled = False
        self.seq: Sequence | None = None
        self.n_cached = 0  # prompt positions kept from the slot's KV cache
        self.finish_reason: str | None = None
        self.slot: int | None = None

    @property
    def n_completion(self) -> int:
        return self.seq.n_new if self.seq is not None else 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    def __init__(self, model, max_queue: int = 64):
        self.model = model
        self._engine = model._engine
        self._batched = hasattr(self._engine, "decode_batch")
        self.n_slots = self._engine.n_seq if self._batched else 1
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._last_used = [0.0] * self.n_slots
        self._cv = threading.Condition()
        self._closing = False
        decode = model.tokenizer.decode if model.tokenizer is not None else (lambda ids: "".join(f" {i}" for i in ids))
        self._decode_text = decode
        self.steps = 0  # decode steps run (each one token for every running request)
        self.peak_batch = 0  # the most requests one decode step has run together
        self._thread = threading.Thread(target=self._run, name="edgemoe-scheduler", daemon=True)
        self._thread.start()

    # --- called from the server's threads -------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for the {self.n_slots} "
                                f"sequence slots (the queue holds {self.max_queue}); retry later")
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: the job leaves its slot (or the queue) before the next step."""
        with self._cv:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
            self._cv.notify()

    def load(self) -> dict:
        with self._cv:
            return {"slots": self.n_slots, "running": len(self._running), "waiting": len(self._waiting),
                    "decode_steps": self.steps, "peak_batch": self.peak_batch}

    def close(self) -> None:
        """Cancel what is queued or running (each gets an error event) and stop the worker."""
        with self._cv:
            self._closing = True
            for job in list(self._waiting) + list(self._running.values()):
                job.cancelled = True
            self._cv.notify()
        self._thread.join()

    # --- the worker thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._running and not self._closing:
                    self._cv.wait()
                if self._closing:
                    for job in list(self._waiting):
                        job.emit("error", "the server is shutting down")
                    self._waiting.clear()
                admit = []
                free = [s for s in range(self.n_slots) if s not in self._running]
                while free and self._waiting:
                    job = self._waiting.popleft()
                    slot = self._pick_slot(free, job.ids)
                    free.remove(slot)
                    job.slot = slot
                    self._running[slot] = job
                    admit.append(job)
            try:
                for job in admit:
                    self._start(job)
                self._drop_cancelled()
                if self._running:
                    self._step()
                elif self._closing:
                    return
            except Exception as e:  # noqa: BLE001 - a bug must not kill the worker: fail the requests, keep serving
                print(f"edgemoe serve: internal error in the scheduler: {type(e).__name__}: {e}", file=sys.stderr)
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _pick_slot(self, free: list[int], ids: list[int]) -> int:
        """The free slot whose KV cache shares the longest prefix with the prompt; among equals the least recently
        used (so a cache another client may come back to is kept longest)."""
        def cached(s: int) -> list[int]:
            return self._engine.seq_cached_ids(s) if self._batched and s else self._engine.cached_ids

        return max(free, key=lambda s: (_common_prefix(cached(s), ids[:-1]), -self._last_used[s]))

    def _start(self, job: Job) -> None:
        slot = job.slot
        if job.cancelled:
            self._finish(job, None)
            return
        cached = self._engine.seq_cached_ids(slot) if self._batched and slot else self._engine.cached_ids
        job.n_cached = _common_prefix(cached, job.ids[:-1])
        job.seq = Sequence(job.ids, job.decoding, self._decode_text, self.model.spec.eos_token_id,
                           self.model.max_ctx, job.constraint)
        try:
            logits = self.model._prefill_reusing_cache(job.ids, slot)
        except Exception as e:  # noqa: BLE001 - e.g. an expert read failing: this request fails, the server lives
            self._reset_slot(slot)
            self._finish(job, None, f"{type(e).__name__}: {e}")
            return
        self._advance(job, logits)

    def _advance(self, job: Job, logits) -> None:
        try:
            piece, reason = job.seq.step(logits)
        except Exception as e:  # noqa: BLE001 - e.g. no token can continue the JSON: this request fails, not all
            self._finish(job, None, f"{type(e).__name__}: {e}")
            return
        if piece:
            job.emit("text", piece)
        if reason:
            self._finish(job, reason)

    def _step(self) -> None:
        slots = sorted(self._running)
        tokens = [self._running[s].seq.token for s in slots]
        t0 = time.perf_counter()
        try:
            if self._batched:
                logits = self._engine.decode_batch(tokens, slots)
            else:
                logits = [self._engine.decode(tokens[0])]
        except Exception as e:  # noqa: BLE001 - the step failed for all of them (no sequence advanced)
            self._fail_all(f"{type(e).__name__}: {e}")
            return
        self.model._stats["decode_tokens"] += len(slots)
        self.model._stats["decode_s"] += time.perf_counter() - t0
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(slots))
        for row, slot in enumerate(slots):
            self._advance(self._running[slot], logits[row])

    def _drop_cancelled(self) -> None:
        for slot, job in list(self._running.items()):
            if job.cancelled:
                self._finish(job, None, "cancelled" if not self._closing else "the server is shutting down")

    def _finish(self, job: Job, reason: str | None, error: str | None = None) -> None:
        with self._cv:
            if self._running.get(job.slot) is job:
                del self._running[job.slot]
            self._last_used[job.slot] = time.monotonic()
        job.finish_reason = reason
        if reason is not None:
            job.emit("done", reason)
        else:
            job.emit("error", error or "cancelled")

    def _fail_all(self, message: str) -> None:
        for slot, job in list(self._running.items()):
            self._reset_slot(slot)
            self._finish(job, None, message)

    def _reset_slot(self, slot: int) -> None:
        try:  # its KV cache may hold half a step: start it empty
            self._engine.reset(slot) if self._batched else self._engine.reset()
        except Exception:  # noqa: BLE001, S110 - already failing; the next prefill resets it again
            pass
