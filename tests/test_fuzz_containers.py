"""The container fuzz corpus (tests/hostile_containers.py) replayed through the API and the CLI.

Each case is opened resident (`edgemoe.load(path)` + a 2-token generate) and under a memory budget, in child
processes that each run a batch of cases (a crash or hang kills only its child: the case is recorded and the batch
goes on with the next one). Outcomes per case and mode: ran, refused (an EdgeMoEError), traceback (any other
exception, or a message saying "internal error"), crash (the child died), hang (no answer within the timeout).
Failures: crashes, hangs, tracebacks, invalid files that ran, valid files that were refused. All must be 0.

By default a deterministic sample (every 5th case of each class and base plus every duplicate-key and deep-nesting
case, about 1190 cases) and 21 CLI cases;
EDGEMOE_FUZZ_FULL=1 replays every case (about 5300) and about 200 through the CLI. EDGEMOE_FUZZ_REPORT=FILE writes
every failure (label, mode, outcome, message) as JSON lines. docs/fuzz.md says how to run it and what it found.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from subprocess_python import PYTHON

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hostile_containers as hc

FULL = os.environ.get("EDGEMOE_FUZZ_FULL") == "1"
TIMEOUT = float(os.environ.get("EDGEMOE_FUZZ_TIMEOUT", "20"))  # seconds per case and mode (2 cores, shared)
WORKERS = 2
API_CTX = 32
PROMPT_IDS = [1, 2]
FAILURES = ("crash", "hang", "traceback", "invalid_ran", "valid_refused")


# ---- the child: replays cases, one line per outcome ----------------------------------------------------------------


def _api_outcome(path: str, budget: int | None) -> tuple[str, str]:
    import edgemoe

    try:
        with edgemoe.load(path, memory_budget=budget, max_ctx=API_CTX, threads=1) as m:
            text = m.generate(PROMPT_IDS, max_new_tokens=2)
        return "ran", repr(text)[:80]
    except edgemoe.EdgeMoEError as e:
        msg = str(e)
        return ("traceback" if "internal error" in msg else "refused"), msg[:400]
    except Exception as e:  # noqa: BLE001 - what the fuzz looks for
        return "traceback", f"{type(e).__name__}: {e}"[:400]


def worker_main(spec_path: str) -> int:
    """Child process: spec = {bases: {name: path}, budgets: {name: bytes}, labels: [...], tmp: dir}."""
    import faulthandler
    import resource

    spec = json.loads(Path(spec_path).read_text())
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the protocol
    faulthandler.enable()
    cap = 6 << 30  # a hostile size must fail as an allocation, not take the machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    bases = hc.load_bases({k: Path(v) for k, v in spec["bases"].items()})
    by_label = {c.label: c for c in hc.cases(bases)}
    path = os.path.join(spec["tmp"], f"case_{os.getpid()}.emoe")
    for i, label in enumerate(spec["labels"]):
        case = by_label[label]
        with open(path, "wb") as f:
            f.write(hc.materialize(case, bases[case.base]))
        for mode in ("resident", "budget"):
            proto.write(f"S {i} {mode}\n")
            outcome, msg = _api_outcome(path, spec["budgets"][case.base] if mode == "budget" else None)
            proto.write("R " + json.dumps({"i": i, "mode": mode, "outcome": outcome, "msg": msg}) + "\n")
    os.unlink(path) if os.path.exists(path) else None
    proto.write("DONE\n")
    return 0


# ---- the parent: batches, crash and hang isolation -----------------------------------------------------------------


class _Child:
    def __init__(self, labels: list[str], start: int, common: dict, tmp: Path, n: int):
        self.labels, self.start = labels, start
        spec = dict(common, labels=labels[start:], tmp=str(tmp))
        self.spec_path = tmp / f"spec_{n}.json"
        self.spec_path.write_text(json.dumps(spec))
        self.err_path = tmp / f"stderr_{n}.txt"
        self.err = open(self.err_path, "wb")  # noqa: SIM115 - closed in finish()
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", str(self.spec_path)], stdout=subprocess.PIPE,
                                  stderr=self.err, stdin=subprocess.DEVNULL, start_new_session=True)
        self.buf = b""
        self.current: tuple[int, str] | None = None  # (absolute case index, mode) started, not answered
        self.deadline = time.monotonic() + TIMEOUT + 30  # the first case also imports numpy and the core
        self.done = False

    def lines(self) -> list[str] | None:
        """Complete lines read so far, or None at end of file (the child exited)."""
        chunk = os.read(self.p.stdout.fileno(), 65536)
        if not chunk:
            return None
        self.buf += chunk
        *whole, self.buf = self.buf.split(b"\n")
        return [w.decode() for w in whole]

    def stderr_tail(self) -> str:
        self.err.flush()
        text = self.err_path.read_text(errors="replace")
        return " | ".join(line for line in text.strip().splitlines()[-6:])[-600:]

    def finish(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait()
        self.p.stdout.close()
        self.err.close()


def _crashes_alone(label: str, common: dict, tmp: Path) -> bool:
    """Whether one case also kills a fresh child by itself (a crash inside a batch may be an earlier case's heap
    damage surfacing later)."""
    spec = tmp / "spec_alone.json"
    spec.write_text(json.dumps(dict(common, labels=[label], tmp=str(tmp))))
    try:
        r = subprocess.run([sys.executable, __file__, "--worker", str(spec)], capture_output=True, timeout=TIMEOUT * 3,
                           check=False)
    except subprocess.TimeoutExpired:
        return True
    return r.returncode != 0


def replay(cases: list, bases: dict[str, Path], budgets: dict[str, int], tmp: Path) -> dict:
    """-> {(label, mode): (outcome, message)} for every case, in WORKERS child processes."""
    common = {"bases": {k: str(v) for k, v in bases.items()}, "budgets": budgets}
    shares = [[c.label for c in cases[w::WORKERS]] for w in range(WORKERS)]
    results: dict = {}
    sel = selectors.DefaultSelector()
    n_spawned = 0

    def spawn(labels, start):
        nonlocal n_spawned
        n_spawned += 1
        ch = _Child(labels, start, common, tmp, n_spawned)
        sel.register(ch.p.stdout, selectors.EVENT_READ, ch)
        return ch

    def restart_after(ch, outcome, msg):
        i, mode = ch.current
        if outcome == "crash" and not _crashes_alone(ch.labels[i], common, tmp):
            # the heap was damaged by an earlier case of this child, which itself returned normally
            msg = f"crashed only after earlier cases in the same process ({', '.join(ch.labels[max(0, i - 3):i])}" \
                  f" ran just before; alone it does not crash): {msg}"
        results[(ch.labels[i], mode)] = (outcome, msg)
        if mode == "resident":  # the budgeted run of that case still gets its own try
            results[(ch.labels[i], "budget")] = ("not_run", "after a failure of the resident run")
        sel.unregister(ch.p.stdout)
        ch.finish()
        if i + 1 < len(ch.labels):
            spawn(ch.labels, i + 1)

    for share in shares:
        if share:
            spawn(share, 0)
    while sel.get_map():
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            ch = key.data
            if now > ch.deadline and not ch.done:
                if ch.current is None:
                    raise RuntimeError(f"fuzz worker made no progress: {ch.stderr_tail()}")
                restart_after(ch, "hang", f"no answer in {TIMEOUT:.0f} s")
        for key, _ in sel.select(timeout=1.0):
            ch = key.data
            lines = ch.lines()
            if lines is None:  # the child exited: done, or died inside a case
                if ch.current is not None:
                    rc = ch.p.wait()
                    restart_after(ch, "crash", f"exit status {rc}: {ch.stderr_tail()}")
                    continue
                sel.unregister(ch.p.stdout)
                ch.finish()
                if not ch.done:
                    raise RuntimeError(f"fuzz worker exited outside a case: {ch.stderr_tail()}")
                continue
            for line in lines:
                if line.startswith("S "):
                    _, i, mode = line.split()
                    ch.current = (ch.start + int(i), mode)
                    ch.deadline = time.monotonic() + TIMEOUT
                elif line.startswith("R "):
                    r = json.loads(line[2:])
                    results[(ch.labels[ch.start + r["i"]], r["mode"])] = (r["outcome"], r["msg"])
                    ch.current = None
                elif line == "DONE":
                    ch.done = True
    return results


def classify(case, mode: str, outcome: str) -> str | None:
    """The failure class of one outcome, or None."""
    expect = case.expect if mode == "resident" else case.expect_budget
    if outcome in ("crash", "hang", "traceback"):
        return outcome
    if outcome == "ran" and expect == "refuse":
        return "invalid_ran"
    if outcome == "refused" and expect == "run":
        return "valid_refused"
    return None


def summarize(cases: list, results: dict) -> tuple[Counter, list[dict]]:
    counts: Counter = Counter()
    failures = []
    for c in cases:
        for mode in ("resident", "budget"):
            outcome, msg = results.get((c.label, mode), ("missing", ""))
            counts[(mode, outcome)] += 1
            f = classify(c, mode, outcome)
            if f:
                counts[f] += 1
                counts[(f, c.cls)] += 1
                failures.append({"label": c.label, "mode": mode, "failure": f, "expect": c.expect, "msg": msg})
    return counts, failures


def minimum_budget(path: Path, max_ctx: int | None) -> int:
    """The smallest budget the valid container loads in (bisection; a test helper, not a product API)."""
    import edgemoe

    def fits(b):
        try:
            edgemoe.load(path, memory_budget=b, max_ctx=max_ctx, threads=1).close()
            return True
        except edgemoe.EdgeMoEError:
            return False

    lo, hi = 1, 1 << 20
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def budgets_for(bases: dict[str, Path], max_ctx: int | None) -> dict[str, int]:
    """A budget per valid container: twice its minimum. The minimum holds one layer's top-k experts and scratch that
    grows with top_k: a valid file whose top_k was raised to n_experts must still fit (with the minimum + half the
    expert bytes it did not; a merged model counts top_k experts even where a layer stores fewer)."""
    return {name: 2 * minimum_budget(path, max_ctx) for name, path in bases.items()}


# ---- the CLI ----------------------------------------------------------------------------------------------------


def cli_outcome(path: Path, budget: int | None) -> tuple[str, str]:
    cmd = [*PYTHON, "-m", "edgemoe", "run", str(path), "-p", "hi", "-n", "2"]
    if budget:
        cmd += ["--budget", str(budget)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT + 30, check=False)
    except subprocess.TimeoutExpired:
        return "hang", " ".join(cmd)
    err = r.stderr.strip()
    tail = err.splitlines()[-1][:400] if err else ""
    if r.returncode == 0:
        return "ran", r.stdout[:80]
    if r.returncode < 0 or r.returncode > 1:
        return "crash", f"exit status {r.returncode}: {err[-400:]}"
    if "Traceback" in err or "internal error" in err or not err.startswith("edgemoe: error:"):
        return "traceback", err[-400:]
    return "refused", tail


def cli_sample(cases: list, full: bool) -> list:
    """One case per class (bases taken in turn), or with full every 25th case of each class and base; cases that
    damage the tokenizer are left out (the CLI's prompt needs it, the API runs token ids)."""
    usable = [c for c in cases if "tokenizer" not in c.label]
    if full:
        return hc.sample(usable, 25)
    by_cls: dict[str, list] = {}
    for c in usable:
        by_cls.setdefault(c.cls, []).append(c)
    return [v[len(by_cls) * 7 % len(v)] for v in by_cls.values()]


# ---- the test -------------------------------------------------------------------------------------------------------


def _write_report(failures: list[dict]) -> None:
    path = os.environ.get("EDGEMOE_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in failures)


def _describe(counts: Counter, failures: list[dict], n: int, what: str) -> str:
    lines = [f"{what}: {n} cases x 2 modes; " + ", ".join(f"{k} {counts[k]}" for k in FAILURES)]
    by_cls = sorted((k[1], k[0], v) for k, v in counts.items() if isinstance(k, tuple) and k[0] in FAILURES)
    lines += [f"  {cls}: {f} {v}" for cls, f, v in by_cls]
    lines += [f"  {x['failure']} [{x['mode']}] {x['label']} (expect {x['expect']}): {x['msg'][:200]}"
              for x in failures[:60]]
    return "\n".join(lines)


def test_hostile_containers_api_and_cli(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    bases = hc.build_bases(root / "bases", tiny_dir)
    loaded = hc.load_bases(bases)
    all_cases = hc.cases(loaded)
    assert len(all_cases) >= 2000
    cases = all_cases if FULL else hc.sample(all_cases, 5)
    api_budgets = budgets_for(bases, API_CTX)
    results = replay(cases, bases, api_budgets, root)
    counts, failures = summarize(cases, results)

    cli_cases = cli_sample(all_cases, FULL)
    cli_budgets = budgets_for(bases, None)
    work = root / "cli"
    work.mkdir()

    def one(c):
        path = work / hc.file_name(c)
        path.write_bytes(hc.materialize(c, loaded[c.base]))
        out = {(c.label, "resident"): cli_outcome(path, None), (c.label, "budget"): cli_outcome(path, cli_budgets[c.base])}
        path.unlink()
        return out

    cli_results: dict = {}
    with ThreadPoolExecutor(WORKERS) as ex:
        for r in ex.map(one, cli_cases):
            cli_results.update(r)
    cli_counts, cli_failures = summarize(cli_cases, cli_results)
    _write_report([dict(x, via="api") for x in failures] + [dict(x, via="cli") for x in cli_failures])
    report = _describe(counts, failures, len(cases), "API") + "\n" + _describe(cli_counts, cli_failures,
                                                                                len(cli_cases), "CLI")
    print(report)
    assert sum(counts[k] for k in FAILURES) + sum(cli_counts[k] for k in FAILURES) == 0, report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: run through pytest (tests/test_fuzz_containers.py); --worker SPEC is the child process")
