"""`edgemoe chat` driven as a person drives it: through a pseudo-terminal, two turns, then /exit or Ctrl-D.

Every read has a deadline and the child is killed on failure, so a hung chat fails the test instead of hanging it.
"""

import os
import pty
import select
import subprocess
import time

import pytest
from subprocess_python import PYTHON

import edgemoe

TIMEOUT = 60.0


class PtyChild:
    def __init__(self, args, cwd):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([*PYTHON, "-m", "edgemoe", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=cwd, close_fds=True)
        os.close(slave)
        self.seen = b""
        self.pos = 0  # how far read_until has consumed `seen` (a read may bring more than one marker)

    def read_until(self, marker: bytes, timeout: float = TIMEOUT) -> str:
        """Everything the terminal shows up to and including `marker` (after what earlier calls consumed)."""
        start = self.pos
        deadline = time.monotonic() + timeout
        while marker not in self.seen[start:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {marker!r}; the terminal shows:\n{self.text()}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the chat ended before {marker!r}:\n{self.text()}")
                self.seen += chunk
        end = self.seen.index(marker, start) + len(marker)
        self.pos = end
        return self.seen[start:end].decode(errors="replace").replace("\r\n", "\n")

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def drain_and_wait(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                self.seen += chunk
                if not chunk:
                    break
            elif self.proc.poll() is not None:
                break
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def text(self) -> str:
        return self.seen.decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)


@pytest.fixture
def chat(tmp_path):
    children = []

    def start(*args):
        c = PtyChild([str(a) for a in args], tmp_path)
        children.append(c)
        return c

    yield start
    for c in children:
        c.close()


def expected_replies(model, turns, n):
    """What Model.chat answers (greedy) to each turn of the conversation, as the CLI keeps it."""
    messages, replies = [], []
    with edgemoe.load(model) as m:
        for t in turns:
            messages.append({"role": "user", "content": t})
            reply = m.chat(messages, max_new_tokens=n)
            replies.append(reply)
            messages.append({"role": "assistant", "content": reply.strip()})
    return replies


@pytest.mark.parametrize("quit_with", [b"/exit\n", b"\x04"], ids=["slash-exit", "ctrl-d"])
def test_two_turns_through_a_pseudo_terminal(chat, tiny_emoe, quit_with):
    model = tiny_emoe("qwen3moe", 32)
    turns = ["hello there", "the quick brown fox"]
    want = expected_replies(model, turns, 12)
    # the second answer depends on the first turn: a chat that lost its history would show a different one
    assert want[1] != expected_replies(model, turns[1:], 12)[0]
    c = chat("chat", model, "-n", 12)
    c.read_until(b"> ")
    shown = []
    for t in turns:
        c.send(t.encode() + b"\n")
        shown.append(c.read_until(b"\n> "))
    for t, reply, screen in zip(turns, want, shown):
        assert t in screen  # the terminal echoes what was typed
        assert reply.strip() and reply.strip() in screen, (reply, screen)
    c.send(quit_with)
    assert c.drain_and_wait() == 0, c.text()
    assert "Traceback" not in c.text()


def test_reset_forgets_and_the_next_turn_answers_as_the_first(chat, tiny_emoe):
    model = tiny_emoe("qwen3moe", 32)
    first = expected_replies(model, ["to be or not"], 10)[0]
    c = chat("chat", model, "-n", 10)
    c.read_until(b"> ")
    c.send(b"hello there\n")
    c.read_until(b"\n> ")
    c.send(b"/reset\n")
    c.read_until(b"forgotten")
    c.read_until(b"> ")
    c.send(b"to be or not\n")
    assert first.strip() in c.read_until(b"\n> ")
    c.send(b"/exit\n")
    assert c.drain_and_wait() == 0
