"""The server's continuous-batching scheduler, in-process (no web stack): requests that join while others run give
exactly the text they give alone, a cancelled request leaves its slot at the next step, the prompt prefix a slot
holds is reused, and an engine failure fails the requests but not the worker."""

import threading
import time

import pytest

import edgemoe
from edgemoe.sampling import SamplingParams
from edgemoe.server.scheduler import Job, QueueFull, Scheduler
from edgemoe.server.sequence import Decoding


class Collector:
    """A job's events; `delay` seconds per text piece slows the worker down (the test's stand-in for a big model)."""

    def __init__(self, delay: float = 0.0):
        self.pieces, self.end, self.delay = [], None, delay
        self.done = threading.Event()

    def emit(self, kind, value):
        if kind == "text":
            self.pieces.append(value)
            time.sleep(self.delay)
        else:
            self.end = (kind, value)
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@pytest.fixture(scope="module")
def model(tiny_emoe):
    with edgemoe.load(tiny_emoe("qwen3moe"), n_seq=3) as m:
        yield m


def job(model, prompt: str, n: int, delay: float = 0.0) -> tuple[Job, Collector]:
    c = Collector(delay)
    return Job(model.encode(prompt), Decoding(max_new_tokens=n, params=SamplingParams()), c.emit), c


PROMPTS = ["the quick brown fox", "to be or not to be", "that is the question", "over the lazy dog", "jumps over"]


def test_joining_requests_equal_alone(model):
    want = [model.generate(p, max_new_tokens=12) for p in PROMPTS]
    s = Scheduler(model)
    try:
        jobs = []
        for p in PROMPTS:  # one after another, each joining the running batch (3 slots for 5 requests)
            jobs.append(job(model, p, 12, delay=0.01))
            s.submit(jobs[-1][0])
            time.sleep(0.01)
        for _, c in jobs:
            assert c.done.wait(30)
        assert [c.text for _, c in jobs] == want
        assert all(c.end == ("done", "length") or c.end == ("done", "stop") for _, c in jobs)
        assert s.peak_batch == 3  # all three slots decoded in the same steps
        assert s.load()["running"] == 0
    finally:
        s.close()


def test_cancel_frees_the_slot(model):
    s = Scheduler(model)
    try:
        slow, c = job(model, "the quick brown fox", 200, delay=0.02)  # ~4 s if it ran to the end
        s.submit(slow)
        while len(c.pieces) < 3:
            time.sleep(0.01)
        t0 = time.monotonic()
        s.cancel(slow)
        assert c.done.wait(5) and c.end == ("error", "cancelled")
        assert time.monotonic() - t0 < 1.0 and slow.n_completion < 50
        assert s.load()["running"] == 0
        nxt, c2 = job(model, "to be or not to be", 8)
        s.submit(nxt)
        assert c2.done.wait(30) and c2.text == model.generate("to be or not to be", max_new_tokens=8)
    finally:
        s.close()


def test_prefix_reused_in_the_same_slot(model):
    s = Scheduler(model)
    try:
        first, c = job(model, "the quick brown fox jumps over the lazy dog", 6)
        s.submit(first)
        assert c.done.wait(30)
        again, c2 = job(model, "the quick brown fox jumps over the lazy dog to be", 6)
        s.submit(again)
        assert c2.done.wait(30)
        assert again.slot == first.slot and again.n_cached == len(first.ids)
        assert c2.text == model.generate("the quick brown fox jumps over the lazy dog to be", max_new_tokens=6)
    finally:
        s.close()


def test_queue_limit_and_engine_failure(model):
    s = Scheduler(model, max_queue=0)
    try:
        with pytest.raises(QueueFull, match="retry later"):
            s.submit(job(model, "the quick", 4)[0])
    finally:
        s.close()
    s = Scheduler(model)
    try:
        bad = Job([10**6], Decoding(max_new_tokens=4), Collector().emit)  # outside the vocabulary: prefill fails
        c = Collector()
        bad.emit = c.emit
        s.submit(bad)
        assert c.done.wait(30) and c.end[0] == "error" and "vocabulary" in c.end[1]
        ok, c2 = job(model, "the quick", 4)
        s.submit(ok)
        assert c2.done.wait(30) and c2.end[0] == "done"  # the worker lives on
    finally:
        s.close()
