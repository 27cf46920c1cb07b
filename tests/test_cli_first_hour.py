"""What a new user meets on the command line: finish reasons, the context's end, budgets that pick a context, sizes
echoed as typed, files that are not containers, the thread default, a base model in chat (subprocesses on tiny
models)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from subprocess_python import PYTHON
from test_cli_chat import PtyChild  # tests/ is on sys.path (conftest.py)

import edgemoe as em
from edgemoe.cli_options import MAX_DEFAULT_THREADS, physical_cores
from edgemoe.model import budget_plan


def edgemoe(cwd, *args, input=None, merged=False):
    return subprocess.run([*PYTHON, "-m", "edgemoe", *map(str, args)], check=False, capture_output=not merged,
                          stdout=subprocess.PIPE if merged else None, stderr=subprocess.STDOUT if merged else None,
                          text=True, cwd=cwd, input=input, timeout=300)


@pytest.fixture(scope="module")
def olmoe(tiny_emoe):
    return tiny_emoe("olmoe", 32)  # max_position 256, a tokenizer, no chat template


def test_run_json_reports_why_it_stopped(tmp_path, olmoe):
    r = edgemoe(tmp_path, "run", olmoe, "-p", "the quick brown", "-n", "5", "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 0 and d["finish_reason"] in ("length", "stop") and d["stats"]["finish_reason"] == \
        d["finish_reason"]
    if d["finish_reason"] == "length":
        assert d["completion_tokens"] == 5
    r = edgemoe(tmp_path, "run", olmoe, "-p", "the quick brown", "-n", "500", "--max-ctx", "16", "--json",
                "--temperature", "0.9", "--seed", "3")
    d = json.loads(r.stdout)
    assert r.returncode == 0
    assert d["finish_reason"] in ("context", "stop") and d["prompt_tokens"] + d["completion_tokens"] <= 16
    r = edgemoe(tmp_path, "run", olmoe, "-p", "the quick brown", "-n", "60", "--max-ctx", "16", "--context-shift",
                "--keep", "2", "--json", "--temperature", "0.9", "--seed", "3")
    d = json.loads(r.stdout)
    assert r.returncode == 0, r.stderr
    if d["finish_reason"] == "length":  # (a sampled end-of-sequence may stop it first)
        assert d["completion_tokens"] == 60 and d["context_shifts"] >= 3
    assert d["stats"]["context_shifts"] == d["context_shifts"]


def test_the_context_shift_on_the_command_line_matches_the_api(tmp_path, olmoe):
    args = {"max_new_tokens": 40, "stop_at_eos": False, "context_shift": True, "n_keep": 3}
    with em.load(olmoe, max_ctx=16) as m:
        want = m.generate("the quick brown", return_info=True, **args)
    assert want.context_shifts >= 3
    r = edgemoe(tmp_path, "run", olmoe, "-p", "the quick brown", "-n", "40", "--max-ctx", "16", "--context-shift",
                "--keep", "3", "--json")
    d = json.loads(r.stdout)
    if d["finish_reason"] == "length":  # the CLI stops at end-of-sequence; the API call above did not
        assert d["text"] == want.text and d["context_shifts"] == want.context_shifts


def test_a_long_prompt_gets_command_line_advice_or_is_truncated(tmp_path, olmoe):
    long = "the quick brown fox jumps over the lazy dog " * 12
    r = edgemoe(tmp_path, "run", olmoe, "-p", long, "-n", "4", "--max-ctx", "32")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--max-ctx" in r.stderr and "--truncate left" in r.stderr and "edgemoe.load" not in r.stderr
    r = edgemoe(tmp_path, "run", olmoe, "-p", long, "-n", "4", "--max-ctx", "32", "--truncate", "left", "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 0 and d["prompt_tokens"] == 28 and d["prompt_tokens_truncated"] > 0


def test_a_budget_without_max_ctx_picks_a_context_that_fits_and_says_so(tmp_path, olmoe):
    threads = min(physical_cores(), MAX_DEFAULT_THREADS)
    full = budget_plan(olmoe, 256, threads, "exact", None, 1)["minimum_bytes"]
    at64 = budget_plan(olmoe, 64, threads, "exact", None, 1)["minimum_bytes"]
    at128 = budget_plan(olmoe, 128, threads, "exact", None, 1)["minimum_bytes"]
    assert at64 < at128 < full
    budget = f"{(at64 + at128) // 2}B"  # holds a context of 64, not 128, nor the model's 256
    r = edgemoe(tmp_path, "run", olmoe, "-p", "the quick", "-n", "3", "--budget", budget)
    assert r.returncode == 0, r.stderr
    assert "context 64 tokens (of the model's 256)" in r.stderr
    r = edgemoe(tmp_path, "chat", olmoe, "--budget", budget, "-n", "3", input="hello\n")
    assert r.returncode == 0, r.stderr
    assert "context 64 tokens" in r.stderr
    with em.load(olmoe, memory_budget=budget, threads=threads, max_ctx=64) as m:  # and it does load there
        assert m.max_ctx == 64
    r = edgemoe(tmp_path, "run", olmoe, "-p", "the quick", "--budget", budget, "--max-ctx", "256")
    assert r.returncode == 1 and "pass --max-ctx 64" in r.stderr  # an explicit context: the message says what fits


@pytest.mark.parametrize("typed, echoed", [("10KB", "10.0 KB"), ("8MB", None), ("1MiB", "1.0 MiB")])
def test_sizes_are_echoed_in_the_units_typed(tmp_path, olmoe, typed, echoed):
    r = edgemoe(tmp_path, "run", olmoe, "-p", "x", "--budget", typed, "--max-ctx", "256")
    if echoed is None:  # fits: the statistics line says the budget as typed
        assert r.returncode == 0 and "(budget 8.0 MB)" in r.stderr
    else:
        assert r.returncode == 1 and f"memory budget {echoed} (" in r.stderr and "is below the minimum" in r.stderr
        assert "0.0 MiB" not in r.stderr


def test_a_gguf_or_checkpoint_directory_points_to_export(tmp_path, tiny_dir):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    for cmd in (["run", gguf, "-p", "x"], ["chat", gguf], ["info", gguf], ["bench", gguf]):
        r = edgemoe(tmp_path, *cmd)
        assert r.returncode == 1 and f"edgemoe export {gguf} -o m.emoe" in r.stderr, r.stderr
    src = tiny_dir("olmoe")
    r = edgemoe(tmp_path, "run", src, "-p", "x")
    assert r.returncode == 1 and "Hugging Face checkpoint directory" in r.stderr and f"edgemoe export {src}" in r.stderr


def _cpuinfo_cores() -> int | None:
    """An independent count: distinct (physical id, core id) pairs in /proc/cpuinfo (None where it lacks them)."""
    try:
        blocks = Path("/proc/cpuinfo").read_text().strip().split("\n\n")
    except OSError:
        return None
    pairs = set()
    for b in blocks:
        fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in b.splitlines())}
        if "physical id" not in fields or "core id" not in fields:
            return None
        pairs.add((fields["physical id"], fields["core id"]))
    return len(pairs)


def test_threads_default_to_the_physical_cores(tmp_path):
    cores = physical_cores()
    independent = _cpuinfo_cores()
    if independent is not None and len(os.sched_getaffinity(0)) == os.cpu_count():  # no CPU masked off
        assert cores == independent
    assert 1 <= cores <= os.cpu_count()
    r = edgemoe(tmp_path, "run", "--help")
    assert f"(default {min(cores, MAX_DEFAULT_THREADS)}: this machine's physical cores" in " ".join(r.stdout.split())


def test_chat_says_once_that_a_model_without_a_template_is_a_base_model(tmp_path, olmoe):
    r = edgemoe(tmp_path, "chat", olmoe, "-n", "3", input="hello\nagain\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("probably a base model") == 1


def test_on_a_terminal_the_statistics_start_on_their_own_line(tmp_path, olmoe):
    c = PtyChild(["run", str(olmoe), "-p", "the quick brown", "-n", "8"], tmp_path)
    try:
        assert c.drain_and_wait() == 0
        screen = c.text()
    finally:
        c.close()
    assert re.search(r"(^|\n)\[engine ", screen), screen


def test_bench_says_when_its_token_counts_exceed_the_context(tmp_path, olmoe):
    r = edgemoe(tmp_path, "bench", olmoe)  # the defaults, -p 512 -n 128, on a model of 256 positions
    assert r.returncode == 1 and "needs a context of 648 tokens" in r.stderr and "-p 128 -n 64" in r.stderr
