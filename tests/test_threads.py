"""One Model called from several threads (issue 13, item 5): calls run one at a time, so every result is the one the
same calls give in series, or a clear refusal (a stream whose sequence another call replaced). Never a crash, a hang
or different text.

The threads run in a child process with a timeout: a segfault or a deadlock fails the test, not the test run.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import tempfile
import textwrap

import pytest
from subprocess_python import PYTHON

N = importlib.import_module("edgemoe._native")

import edgemoe
from edgemoe.errors import EdgeMoEError
from edgemoe.fit import minimum_budget_bytes

PROMPTS = ["the cat sat", "once upon a time", "1 2 3 4", "hello world, hello"]
MAX_CTX = 64
N_NEW = 12
# Each thread runs its prompt this many times: plain generate, chat, a stream, generate_batch, logits, reset.
WORKER = """
import json, sys, threading, traceback
import numpy as np
import edgemoe
from edgemoe.errors import EdgeMoEError

path, budget, n_threads, rounds, prompts, n_new, max_ctx = json.loads(sys.argv[1])
m = edgemoe.load(path, memory_budget=budget, max_ctx=max_ctx, threads=2)
results = [[] for _ in range(n_threads)]
errors = []
start = threading.Barrier(n_threads)

def refused(e):
    return "generate_batch" in str(e)

def work(t):
    prompt = prompts[t % len(prompts)]
    start.wait()
    try:
        for r in range(rounds):
            kind = ("generate", "stream", "batch", "logits", "chat", "reset")[(t + r) % 6]
            if kind == "generate":
                results[t].append([kind, prompt, m.generate(prompt, max_new_tokens=n_new)])
            elif kind == "stream":
                try:
                    results[t].append([kind, prompt, "".join(m.generate(prompt, max_new_tokens=n_new, stream=True))])
                except EdgeMoEError as e:
                    if not refused(e):
                        raise
                    results[t].append([kind, prompt, None])
            elif kind == "batch":
                results[t].append([kind, prompt, m.generate_batch([prompt, prompts[0]], max_new_tokens=n_new)])
            elif kind == "logits":
                results[t].append([kind, prompt, m.logits(m.encode(prompt))[-1].tolist()])
            elif kind == "chat":
                msgs = [{"role": "user", "content": prompt}]
                results[t].append([kind, prompt, m.chat(msgs, max_new_tokens=n_new)])
            else:
                m.reset()
    except BaseException:
        errors.append(traceback.format_exc())

threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(n_threads)]
for th in threads:
    th.start()
for th in threads:
    th.join(timeout=240)
hung = sum(th.is_alive() for th in threads)
print(json.dumps({"hung": hung, "errors": errors, "results": results}))
sys.stdout.flush()
import os
os._exit(0)  # a hung thread must not keep the child alive
"""


def _serial(path, budget) -> dict:
    """What each kind of call returns for each prompt, run one after another on one Model."""
    with edgemoe.load(path, memory_budget=budget, max_ctx=MAX_CTX, threads=2) as m:
        out = {}
        for p in PROMPTS:
            out["generate", p] = m.generate(p, max_new_tokens=N_NEW)
            out["stream", p] = "".join(m.generate(p, max_new_tokens=N_NEW, stream=True))
            out["batch", p] = m.generate_batch([p, PROMPTS[0]], max_new_tokens=N_NEW)
            out["logits", p] = m.logits(m.encode(p))[-1]
            out["chat", p] = m.chat([{"role": "user", "content": p}], max_new_tokens=N_NEW)
        assert out["stream", PROMPTS[1]] == out["generate", PROMPTS[1]]
        assert len({out["generate", p] for p in PROMPTS}) > 1  # the prompts give different texts
        return out


@pytest.mark.parametrize("budgeted", [True, False], ids=["budget", "resident"])
@pytest.mark.parametrize("n_threads", [2, 4])
def test_threads_on_one_model_get_the_serial_results_or_a_clear_refusal(tiny_emoe, budgeted, n_threads):
    path = tiny_emoe("olmoe")
    budget = minimum_budget_bytes(path, MAX_CTX, threads=2) if budgeted else None
    serial = _serial(path, budget)
    rounds = 6
    args = json.dumps([str(path), budget, n_threads, rounds, PROMPTS, N_NEW, MAX_CTX])
    p = subprocess.run([*PYTHON, "-c", textwrap.dedent(WORKER), args], capture_output=True, text=True,
                       timeout=300, cwd=tempfile.gettempdir(), check=False)
    assert p.returncode == 0, f"child died ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["hung"] == 0, "a thread did not finish within 240 s"
    assert not out["errors"], out["errors"][0]
    calls = refusals = 0
    for per_thread in out["results"]:
        for kind, prompt, got in per_thread:
            calls += 1
            if got is None:  # a stream refused because another call replaced its sequence
                assert kind == "stream"
                refusals += 1
            elif kind == "logits":
                assert got == serial[kind, prompt].tolist(), f"logits of {prompt!r} differ from the serial run"
            else:
                assert got == serial[kind, prompt], f"{kind}({prompt!r}) differs from the serial run"
    assert calls == n_threads * (rounds - 1)  # every round but the reset returned something
    assert refusals < calls


def test_stream_interleaved_with_another_call_is_refused_clearly(tiny_emoe):
    """In one thread too: a stream resumed after another call replaced its sequence ends with the error that
    points to generate_batch, instead of continuing from the other call's KV cache."""
    path = tiny_emoe("olmoe")
    with edgemoe.load(path, max_ctx=MAX_CTX) as m:
        whole = m.generate(PROMPTS[1], max_new_tokens=N_NEW)
        stream = m.generate(PROMPTS[1], max_new_tokens=N_NEW, stream=True)
        first = next(stream)
        assert whole.startswith(first)
        m.generate(PROMPTS[2], max_new_tokens=2)
        with pytest.raises(EdgeMoEError, match="generate_batch"):
            list(stream)


def test_a_closed_model_refuses_its_verbs(tiny_emoe):
    path = tiny_emoe("olmoe")
    m = edgemoe.load(path, memory_budget=minimum_budget_bytes(path, MAX_CTX), max_ctx=MAX_CTX)
    stream = m.generate(PROMPTS[0], max_new_tokens=N_NEW, stream=True)
    next(stream)
    m.close()
    m.close()  # twice is harmless
    for call in (lambda: m.generate(PROMPTS[0]), lambda: m.logits([1, 2]), m.reset, lambda: list(stream)):
        with pytest.raises(EdgeMoEError, match="closed"):
            call()
