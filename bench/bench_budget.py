"""Decode speed under a hard memory budget: edgemoe (exact, adaptive, on-demand LRU, all-resident) vs llama.cpp.

A random-weight OLMoE-shaped model (hidden 2048, 8 layers, 16 experts top-4, expert ffn 1024; speed does not depend
on the values) exported as q8_0 dense + f16 experts (and MWQ-4 experts for `adaptive`), and the same checkpoint as a
GGUF for llama.cpp. Budgets are fractions of the .emoe file size. Every capped run is a child process placed in a
cgroup-v1 memory cgroup whose limit is the budget + 5% (page cache is charged to the cgroup, so llama.cpp's mmap
thrashes exactly as on a device with that much RAM); the page cache is dropped before each cold run. Systems run
interleaved per budget (A B C A B C) so the machine's noise hits all of them alike.

    python bench/bench_budget.py [--budgets 100,70,50,35] [-n 24] [--threads 2] [--reps 2] [--no-llama]
        [--json bench/budget.json] [--png bench/budget.png]

Reported per run: decode tok/s, p50/p95 per-token latency, peak RSS (VmHWM) against the budget, bytes read per
token, I/O stall fraction, cache hit rate, prefetch recall, and the storage-bandwidth bound
(cold O_DIRECT read bandwidth / bytes that must be read per token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edgemoe.bandwidth import memory_read_bandwidth, storage_read_bandwidth

CGROOT = Path("/sys/fs/cgroup/memory")
DEFAULT_DIR = Path("/tmp/budget")


# ---------------------------------------------------------------------------------------------------------------
# environment: cgroups, page cache, bandwidth

def cgroup_available() -> str | None:
    """None if a memory cgroup can be made here, else the reason."""
    if not (CGROOT / "cgroup.procs").exists():
        return "no cgroup-v1 memory controller at /sys/fs/cgroup/memory"
    probe = CGROOT / f"edgemoe_probe_{os.getpid()}"
    try:
        probe.mkdir()
        (probe / "memory.limit_in_bytes").write_text(str(1 << 30))
        probe.rmdir()
    except OSError as e:
        return f"cannot create a memory cgroup: {e}"
    return None


class MemCgroup:
    """A cgroup-v1 memory cgroup with a hard limit; children are placed into it before they exec."""

    def __init__(self, limit_bytes: int, tag: str):
        self.path = CGROOT / f"edgemoe_bench_{os.getpid()}_{tag}"
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
        try:  # no swap here, but make sure swap cannot extend the cap either
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(int(limit_bytes)))
        except OSError:
            pass
        self.limit = int(limit_bytes)

    def preexec(self):
        procs = str(self.path / "cgroup.procs")

        def enter():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return enter

    def max_usage(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def failcnt(self) -> int:
        return int((self.path / "memory.failcnt").read_text())

    def oom_killed(self) -> bool:
        try:
            return "oom_kill 1" in (self.path / "memory.oom_control").read_text() or any(
                line.startswith("oom_kill ") and int(line.split()[1]) > 0
                for line in (self.path / "memory.oom_control").read_text().splitlines())
        except (OSError, ValueError):
            return False

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def storage_bandwidth(path: Path, nbytes: int = 1 << 30, block: int = 4 << 20, threads: int = 1) -> dict:
    """Cold read bandwidth of `nbytes` in the middle of `path` (the expert data; page cache dropped first), read in
    order in `block`-byte reads (the engine's largest) by `threads` readers: edgemoe.bandwidth's storage probe."""
    size = path.stat().st_size
    nbytes = min(nbytes, size // block * block)
    dropped = drop_caches()
    off0 = (size // 2 - nbytes // 2) // block * block
    r = storage_read_bandwidth(path, [(off0 + i * block, block) for i in range(nbytes // block)], seconds=600,
                               threads=threads, shuffle=False)
    return {"bytes": r["bytes"], "seconds": r["seconds"], "gb_s": r["bytes_per_s"] / 1e9,
            "direct": r["method"] == "O_DIRECT", "cold": dropped, "block": block, "threads": threads}


def memory_bandwidth() -> float:
    """GB/s: edgemoe.bandwidth's memory probe over 1 GiB, one thread."""
    return memory_read_bandwidth(1, 1 << 30, reps=3)["bytes_per_s"] / 1e9


# ---------------------------------------------------------------------------------------------------------------
# models

def child_env(work: Path) -> dict:
    """Environment for child processes: the source tree's edgemoe, and export/ importable as edgemoe_export (how the
    wheel installs it)."""
    (work / "devpath").mkdir(parents=True, exist_ok=True)
    link = work / "devpath" / "edgemoe_export"
    if not link.exists():
        link.symlink_to(ROOT / "export")
    return {**os.environ, "PYTHONPATH": f"{work / 'devpath'}:{ROOT}"}


def ensure_models(work: Path, layers: int) -> dict[str, Path]:
    """The random OLMoE-shaped checkpoint and its exports (made once, kept in `work`): q8_0 dense + f16 experts, the
    same with a fitted pre-attention predictor, q8_0 dense + MWQ-4 experts, and an F16 GGUF for llama.cpp."""
    ckpt = Path("/tmp/olmoe8")
    out = {"ckpt": ckpt, "f16": work / "olmoe8_q8f16.emoe", "f16_pre": work / "olmoe8_q8f16_pre.emoe",
           "mwq4": work / "olmoe8_mwq4.emoe", "gguf": work / "olmoe8_f16.gguf"}
    env = child_env(work)
    if not (ckpt / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "bench/make_random_model.py"), str(ckpt), "--layers",
                        str(layers)], check=True, env=env)
    jobs = {
        "f16": f"from edgemoe_export import export; export({str(ckpt)!r}, {str(out['f16'])!r}, bits=16, "
               f"dense_bits=8, show_progress=False)",
        # the predictor: calibrated on 4096 tokens of text the benchmark's prompt does not use, 1024 more held out
        "f16_pre": "import sys; sys.path.insert(0, {bench!r}); import numpy as np, bench_budget as B\n"
                   "from edgemoe_export.predictor import fit_predictors, add_predictors\n"
                   "ids = np.array(B.prompt_ids(7000, 50304))\n"
                   "seqs = [ids[1000 + 256 * i:1256 + 256 * i] for i in range(16)] + "
                   "[ids[5500 + 256 * i:5756 + 256 * i] for i in range(4)]\n"
                   "p, rep = fit_predictors({ckpt!r}, None, seqs=seqs, show_progress=False)\n"
                   "add_predictors({src!r}, {dst!r}, p, rep)\n".format(bench=str(ROOT / "bench"), ckpt=str(ckpt),
                                                                       src=str(out["f16"]), dst=str(out["f16_pre"])),
        "mwq4": f"from edgemoe_export import export; export({str(ckpt)!r}, {str(out['mwq4'])!r}, bits=4, "
                f"base_bits=2, nesting='msb', show_progress=False)",
        "gguf": f"from edgemoe_export.gguf_export import export_gguf; export_gguf({str(ckpt)!r}, "
                f"{str(out['gguf'])!r}, 'F16', show_progress=False, tokenizer='none')",
    }
    for key, code in jobs.items():
        if not out[key].exists():
            print(f"preparing {out[key]} ...", flush=True)
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return out


def prompt_ids(n: int, vocab: int) -> list[int]:
    """n token ids of real text: the prompt, then the tokens decoded one at a time (teacher forcing)."""
    # held-out Shakespeare or the Python docs in the small model's byte-level BPE: routing follows text, neither random
    # ids nor the loops a random model's greedy decoding falls into
    texts = [ROOT / "export/assets/small-moe/heldout/shakespeare.txt", Path("/tmp/smallmoe/run3/heldout/shakespeare.txt"),
             Path("/usr/share/doc/python3.11/html/_sources/tutorial/introduction.rst.txt")]
    toks = [ROOT / "export/assets/small-moe/tokenizer.json", Path("/tmp/smallmoe/run3/tokenizer.json")]
    text = next((t.read_text(encoding="utf-8", errors="replace")[:20000] for t in texts if t.exists()),
                "To be, or not to be, that is the question: " * 200)
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(next(t for t in toks if t.exists())))
        ids = [i for i in tok.encode(text).ids if i < vocab]
    except Exception:  # noqa: BLE001 - no tokenizer at hand: the bytes of the text
        ids = [b for b in text.encode() if b < vocab]
    return ids[:n]


# ---------------------------------------------------------------------------------------------------------------
# runs

def bench_binary() -> Path:
    for cand in (os.environ.get("EDGEMOE_BENCH"), "/tmp/native_build_cache/edgemoe-bench",
                 str(ROOT / "edgemoe/bin/edgemoe-bench")):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise SystemExit("edgemoe-bench not found: build native/ (cmake) or set EDGEMOE_BENCH")


def run_child(cmd: list[str], cg: MemCgroup | None, timeout: float, env: dict | None = None
              ) -> tuple[dict | None, str]:
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=cg.preexec() if cg else None, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:.0f} s"
    if p.returncode != 0:
        why = "OOM-killed by the cgroup" if p.returncode in (-9, 137) else f"exit status {p.returncode}"
        return None, f"{why}: {p.stderr.strip()[-400:]}"
    try:
        return json.loads(p.stdout), ""
    except json.JSONDecodeError:
        return None, f"unparsable output: {p.stdout[-300:]} {p.stderr[-300:]}"


def run_edgemoe(model: Path, budget: int | None, sysdef: dict, args, ids_file: Path, cg: MemCgroup | None) -> dict:
    cmd = [str(bench_binary()), str(model), "-p", str(args.prompt), "-n", str(args.n), "-t", str(args.threads),
           "-r", "1", "--prompt-file", str(ids_file), "--tg-prompt", "--tg-text", "--json"]
    if budget is not None:
        cmd += ["--budget", str(budget), "--mode", sysdef["mode"], "--prefetch", str(sysdef.get("prefetch", 1)),
                "--prefetch-extra", str(sysdef.get("extra", 0)), "--io-threads", str(args.io_threads),
                "--evict", sysdef.get("evict", "auto")]
        # O_DIRECT is the default (edgemoe-bench, edgemoe.load); --buffered: the page cache, pages kept
        cmd += ["--direct"] if sysdef.get("direct", True) else ["--buffered"]
    out, err = run_child(cmd, cg, args.timeout, sysdef.get("env"))
    if out is None:
        return {"error": err}
    tg = next((r for r in out if r["test"].startswith("tg")), None)
    if not tg:
        return {"error": "no tg result"}
    if tg.get("demand_bytes") is not None:
        tg["demand_bytes_per_token"] = tg["demand_bytes"] / max(1, tg["n_gen"])
    return tg


LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
path, ids, n_prompt, n_gen, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5])
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=n_prompt + n_gen + 8, n_threads=threads, n_threads_batch=threads, n_batch=64,
            verbose=False, use_mmap=True, logits_all=False)
load_s = time.perf_counter() - t0
llm.eval(ids[:n_prompt])
lat, toks = [], []
for i in range(n_gen):  # teacher forcing: the text's next token, like edgemoe-bench --tg-text
    tok = ids[n_prompt + i]
    toks.append(tok)
    t = time.perf_counter()
    llm.eval([tok])
    lat.append(time.perf_counter() - t)
status = open("/proc/self/status").read()
hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"load_s": load_s, "latencies_s": lat, "peak_rss_bytes": hwm, "tokens": toks}))
"""


def run_llama(gguf: Path, ids: list[int], args, cg: MemCgroup | None) -> dict:
    cmd = [sys.executable, "-c", LLAMA_CHILD, str(gguf), json.dumps(ids), str(args.prompt), str(args.n_llama),
           str(args.threads)]
    out, err = run_child(cmd, cg, args.timeout)
    if out is None:
        return {"error": err}
    lat = sorted(out["latencies_s"])
    return {"avg_ts": len(lat) / sum(lat), "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p95_ms": 1e3 * float(np.percentile(lat, 95)), "peak_rss_bytes": out["peak_rss_bytes"],
            "n_gen": len(lat), "load_s": out["load_s"]}


def summarize(r: dict) -> dict:
    keys = ("avg_ts", "p50_ms", "p95_ms", "peak_rss_bytes", "bytes_read_per_token", "demand_bytes_per_token",
            "stall_fraction", "cache_hit_rate", "prefetch_recall", "prefetch_recall_at_k", "prefetch_precision",
            "minimum_bytes", "cache_capacity_bytes", "experts_at_planes", "cgroup_max_usage", "n_gen", "error")
    return {k: r.get(k) for k in keys if k in r}


# ---------------------------------------------------------------------------------------------------------------
# quality on the trained small model: prefetch recall on real routing, the perplexity cost of `adaptive`

TRAINED_CODE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
import edgemoe
from edgemoe.perplexity import perplexity

small, small_pre, heldout, budget_frac = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:-1], float(sys.argv[-1])
texts = {Path(h).stem: Path(h).read_text(encoding="utf-8") for h in heldout}
out = {}

def minimum(path, max_ctx, **kw):
    try:
        edgemoe.load(path, memory_budget=1, max_ctx=max_ctx, **kw)
    except edgemoe.EdgeMoEError as e:
        return int(str(e).split("below the minimum ")[1].split("(")[1].split(" bytes")[0])

def recall(path, budget):
    rows = {}
    for name, text in texts.items():
        m = edgemoe.load(path, memory_budget=budget, max_ctx=520, prefetch=1, prefetch_extra=1)
        ids = m.tokenizer.encode(text)[:513]
        m._engine.prefill(ids[:1])
        m.reset_stats()
        for t in ids[1:]:
            m._engine.decode(t)  # teacher forcing: one held-out token at a time, as decoding sees them
        st = m.stats
        c = m._engine.stats()
        rows[name] = {"recall_k_plus_1": st["prefetch_recall"], "precision": st["prefetch_precision"],
                      "recall_k": c["pred_hits_k"] / max(1, c["true_experts"]), "hit_rate": st["cache_hit_rate"]}
        m.close()
    return rows

def ppl(path, **kw):
    rows = {}
    for name, text in texts.items():
        with edgemoe.load(path, max_ctx=130, **kw) as m:
            r = perplexity(m, text, ctx=128, max_tokens=1024)
            st = m.stats
            rows[name] = {"ppl": r["ppl"], "tokens": r["tokens"], "experts_at_planes": st.get("experts_at_planes")}
    return rows

size = small.stat().st_size
b = max(minimum(small_pre, 520), int(size * budget_frac))
out["budget_bytes"], out["file_bytes"] = b, size
out["recall_router"] = recall(small, b)
out["recall_fitted"] = recall(small_pre, b)
bp = max(minimum(small, 130, direct=True), int(size * budget_frac))
out["ppl_budget_bytes"] = bp
out["ppl_resident"] = ppl(small)
out["ppl_exact_budget"] = ppl(small, memory_budget=bp, mode="exact", direct=True)
out["ppl_adaptive_budget"] = ppl(small, memory_budget=bp, mode="adaptive", direct=True)
for k in (1, 2):
    out[f"ppl_precision_{k}"] = ppl(small, precision=k)
print(json.dumps(out))
"""


def trained_model_study(work: Path, budget_frac: float, timeout: float) -> dict:
    """The shipped trained small model as MWQ-4 (fitted to its calibration text), with and without a fitted
    pre-attention predictor: prefetch recall@(k+1) on held-out text, and perplexity exact / adaptive / fixed precision.
    """
    src = ROOT / "export/assets/small-moe"
    if not (src / "model.safetensors").exists():
        return {"error": f"{src}: the trained small model is missing"}
    small, small_pre = work / "small_mwq4.emoe", work / "small_mwq4_pre.emoe"
    env = child_env(work)
    if not small_pre.exists():
        code = (f"from edgemoe_export import export\n"
                f"from edgemoe_export.predictor import fit_predictors, add_predictors\n"
                f"export({str(src)!r}, {str(small)!r}, bits=4, show_progress=False)\n"
                f"p, rep = fit_predictors({str(src)!r}, {str(src / 'calib.txt')!r}, show_progress=False)\n"
                f"add_predictors({str(small)!r}, {str(small_pre)!r}, p, rep)\n")
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
    heldout = sorted(str(p) for p in (src / "heldout").glob("*.txt"))
    p = subprocess.run([sys.executable, "-c", TRAINED_CODE, str(small), str(small_pre), *heldout, str(budget_frac)],
                       capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if p.returncode:
        return {"error": p.stderr[-2000:]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    c = __import__("edgemoe.container", fromlist=["open_container"]).open_container(small_pre, verify=False)
    out["predictor_fit_report"] = c.metadata.get("predictor", {}).get("report")
    c.close()
    return out


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_DIR)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--budgets", default="100,70,50,35", help="percent of the .emoe file size")
    p.add_argument("-n", type=int, default=32, help="decoded tokens per edgemoe run")
    p.add_argument("--n-llama", type=int, default=8, help="decoded tokens per llama.cpp run")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (real text), prefilled before timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--io-threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions of edgemoe exact / on-demand LRU")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--no-mwq", action="store_true")
    p.add_argument("--no-trained", action="store_true", help="skip the trained small model (recall, perplexity)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", type=Path, default=ROOT / "bench/budget.json", help="raw results")
    p.add_argument("--png", type=Path, default=ROOT / "bench/budget.png")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    models = ensure_models(args.work, args.layers)
    t_prep = time.perf_counter() - t_start
    f16 = models["f16_pre"]
    size = f16.stat().st_size
    from edgemoe.container import open_container

    c = open_container(f16, verify=False)
    vocab = c.spec.vocab
    dense = sum(t.nbytes for t in c.tensors.values() if t.kind == "dense")
    c.close()
    ids = prompt_ids(args.prompt + max(args.n, args.n_llama) + 1, vocab)
    ids_file = args.work / "prompt_ids.txt"
    ids_file.write_text(" ".join(map(str, ids)))
    no_cg = cgroup_available()
    if no_cg:
        print(f"NOTE: {no_cg}; runs are not capped and say so", flush=True)
    env = {"cpu": _cpu(), "threads": args.threads, "io_threads": args.io_threads,
           "cgroup": no_cg or "cgroup v1 memory.limit_in_bytes = budget * 1.05 (edgemoe and llama.cpp alike)",
           "drop_caches": drop_caches(), "model": str(f16), "model_bytes": size, "dense_bytes": dense,
           "gguf": str(models["gguf"]), "gguf_bytes": models["gguf"].stat().st_size, "mwq4": str(models["mwq4"]),
           "mwq4_bytes": models["mwq4"].stat().st_size, "prompt_tokens": args.prompt, "n_gen": args.n,
           "n_gen_llama": args.n_llama, "decode": "teacher-forced held-out text (--tg-text)", "prep_s": t_prep}
    print("storage bandwidth (cold, O_DIRECT 4 MiB reads) ...", flush=True)
    env["storage_qd1"] = storage_bandwidth(f16, 512 << 20)
    env["storage"] = storage_bandwidth(f16, 1 << 30, threads=args.io_threads)
    env["memory_gb_s"] = memory_bandwidth()
    print(json.dumps(env, indent=1), flush=True)

    results = []

    def record(system: str, budget_pct, budget, r: dict):
        row = {"system": system, "budget_pct": budget_pct, "budget_bytes": budget, "cold": True, **summarize(r)}
        results.append(row)
        print(json.dumps(row), flush=True)

    # all-resident reference (no cap): the .emoe mapped, warm
    for _ in range(args.reps):
        record("edgemoe all-resident", None, None, run_edgemoe(f16, None, {}, args, ids_file, None))

    EXACT = {"mode": "exact", "prefetch": 1, "extra": 0}
    EXACT_NOPF = {"mode": "exact", "prefetch": 0}
    LRU = {"mode": "ondemand", "prefetch": 0}
    for pct in [int(x) for x in args.budgets.split(",")]:
        budget = int(size * pct / 100)
        runs = []
        for _ in range(args.reps):  # A B C A B C: the runs the speed-ups are claimed on
            runs += [("edgemoe exact", f16, EXACT, budget), ("edgemoe exact, no prefetch", f16, EXACT_NOPF, budget),
                     ("edgemoe on-demand LRU", f16, LRU, budget)]
        if pct in (50, 35):  # what each part is worth: the cache policy alone, and O_DIRECT
            runs.append(("edgemoe exact, no prefetch, LRU eviction", f16,
                         {**EXACT_NOPF, "evict": "lru"}, budget))
        if pct == 50:
            runs.append(("edgemoe exact, buffered reads", f16, {**EXACT, "direct": False}, budget))
        if not args.no_mwq:
            b4 = int(models["mwq4"].stat().st_size * pct / 100)
            runs += [("edgemoe exact mwq4", models["mwq4"], EXACT, b4),
                     ("edgemoe adaptive mwq4", models["mwq4"], {**EXACT, "mode": "adaptive"}, b4)]
        if not args.no_llama:
            runs.append(("llama.cpp F16 (mmap)", models["gguf"], None, budget))
        for name, model, sysdef, b in runs:
            cg = None if no_cg else MemCgroup(int(b * 1.05), name.split()[0] + str(pct))
            drop_caches()
            try:
                if sysdef is None:
                    r = run_llama(model, ids, args, cg)
                else:
                    r = run_edgemoe(model, b, sysdef, args, ids_file, cg)
                if cg:
                    r["cgroup_max_usage"] = cg.max_usage()
            finally:
                if cg:
                    cg.remove()
            record(name, pct, b, r)

    trained = None
    if not args.no_trained:
        print("trained small model: prefetch recall, adaptive perplexity ...", flush=True)
        trained = trained_model_study(args.work, 0.5, args.timeout)
        print(json.dumps(trained), flush=True)
    env["wall_s"] = time.perf_counter() - t_start
    bw = env["storage"]["gb_s"] * 1e9
    resident = _agg([r for r in results if r["system"] == "edgemoe all-resident"], "avg_ts")
    for row in results:  # the storage-bandwidth bound: bytes that had to be read on demand, at the cold bandwidth
        dpt = row.get("demand_bytes_per_token")
        if dpt:
            row["bound_ts"] = min(bw / dpt, resident or float("inf"))
            row["fraction_of_bound"] = row["avg_ts"] / row["bound_ts"] if row.get("avg_ts") else None
    args.json.write_text(json.dumps({"env": env, "results": results, "trained": trained}, indent=1))
    print(table(results, env))
    if trained and "error" not in trained:
        print(trained_table(trained))
    plot(results, args.png, env)
    print(f"wrote {args.json} and {args.png} in {env['wall_s']:.0f} s (model preparation {t_prep:.0f} s)")
    return 0


def trained_table(t: dict) -> str:
    lines = [(f"trained small model (MWQ-4, file {t['file_bytes'] / 1e6:.1f} MB): prefetch recall on held-out text, "
             f"budget {t['budget_bytes'] / 1e6:.1f} MB"),
             "| text | router recall@k+1 | fitted recall@k+1 | fitted recall@k | fitted precision |",
             "|---|---:|---:|---:|---:|"]
    for name in t["recall_fitted"]:
        r, f = t["recall_router"][name], t["recall_fitted"][name]
        lines.append(f"| {name} | {r['recall_k_plus_1']:.1%} | {f['recall_k_plus_1']:.1%} | "
                     f"{(f.get('recall_k') or 0):.1%} | {f['precision']:.1%} |")
    lines += ["", f"perplexity (ctx 128, 1024 tokens), budget {t['ppl_budget_bytes'] / 1e6:.1f} MB",
              ("| text | resident 4-bit | exact, budget | adaptive, budget | experts at 1/2/3 planes (adaptive) | "
              "fixed 2-bit | fixed 3-bit |"), "|---|---:|---:|---:|---|---:|---:|"]
    for name in t["ppl_resident"]:
        a = t["ppl_adaptive_budget"][name]
        lines.append(f"| {name} | {t['ppl_resident'][name]['ppl']:.3f} | {t['ppl_exact_budget'][name]['ppl']:.3f} | "
                     f"{a['ppl']:.3f} ({a['ppl'] / t['ppl_resident'][name]['ppl'] - 1:+.2%}) | "
                     f"{'/'.join(map(str, a['experts_at_planes']))} | {t['ppl_precision_1'][name]['ppl']:.3f} | "
                     f"{t['ppl_precision_2'][name]['ppl']:.3f} |")
    return "\n".join(lines)


def _cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def _agg(rows: list[dict], key: str):
    v = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(v) if v else None


def table(results: list[dict], env: dict) -> str:
    gib = 1024 ** 3
    lines = [("| system | budget | tok/s | p50 ms | p95 ms | peak RSS / budget | read MB/token | stall | hit rate | "
             "prefetch recall | bound tok/s | of bound |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["system"], r["budget_pct"]), []).append(r)

    def f(v, fmt):
        return "" if v is None else fmt.format(v)

    for (system, pct), rows in groups.items():
        err = next((r["error"] for r in rows if r.get("error")), None)
        rss, b = _agg(rows, "peak_rss_bytes"), rows[0]["budget_bytes"]
        rss_s = f(rss / gib if rss else None, "{:.2f} GiB") + (f" / {b / gib:.2f} ({rss / b:.2f}x)" if b and rss else "")
        bpt = _agg(rows, "bytes_read_per_token")
        if err and "below the minimum" in err:
            ts = "refused: minimum " + err.split("below the minimum ")[1].split(" (")[0]
        else:
            ts = f(_agg(rows, "avg_ts"), "{:.2f}") if not err else "failed: " + err[:80]
        if len(rows) > 1 and not err:
            ts += " (" + ", ".join(f"{r['avg_ts']:.2f}" for r in rows if r.get("avg_ts")) + ")"
        lines.append(
            f"| {system} | {'-' if pct is None else f'{pct}% ({b / gib:.2f} GiB)'} | {ts} | "
            f"{f(_agg(rows, 'p50_ms'), '{:.0f}')} | {f(_agg(rows, 'p95_ms'), '{:.0f}')} | {rss_s} | "
            f"{f(bpt / 1e6 if bpt else None, '{:.0f}')} | {f(_agg(rows, 'stall_fraction'), '{:.0%}')} | "
            f"{f(_agg(rows, 'cache_hit_rate'), '{:.0%}')} | {f(_agg(rows, 'prefetch_recall'), '{:.0%}')} | "
            f"{f(_agg(rows, 'bound_ts'), '{:.1f}')} | {f(_agg(rows, 'fraction_of_bound'), '{:.0%}')} |")
    lines += ["", ("| budget | exact / on-demand LRU | exact no prefetch / on-demand LRU | exact / llama.cpp | "
              "adaptive mwq4 / exact mwq4 |"), "|---|---:|---:|---:|---:|"]
    for pct in sorted({r["budget_pct"] for r in results if r["budget_pct"] is not None}, reverse=True):
        def med(name, pct=pct):
            return _agg([r for r in results if r["system"] == name and r["budget_pct"] == pct], "avg_ts")
        e, l, ll, am, em = (med("edgemoe exact"), med("edgemoe on-demand LRU"), med("llama.cpp F16 (mmap)"),
                            med("edgemoe adaptive mwq4"), med("edgemoe exact mwq4"))
        en = med("edgemoe exact, no prefetch")
        lines.append(f"| {pct}% | {f(e / l if e and l else None, '{:.2f}x')} | {f(en / l if en and l else None, '{:.2f}x')} | "
                     f"{f(e / ll if e and ll else None, '{:.1f}x')} | {f(am / em if am and em else None, '{:.2f}x')} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, env: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    series: dict[str, dict[int, list]] = {}
    for r in results:
        if r["budget_pct"] is None or not r.get("avg_ts") or not r["cold"]:
            continue
        series.setdefault(r["system"], {}).setdefault(r["budget_pct"], []).append(r["avg_ts"])
    for name, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [statistics.median(pts[x]) for x in xs], marker="o", label=name)
    res = [r for r in results if r["system"] == "edgemoe all-resident" and r.get("avg_ts")]
    if res:
        ax.axhline(res[0]["avg_ts"], color="gray", ls="--", lw=1, label="edgemoe all-resident (no cap)")
    ax.set_xlabel("memory budget (% of the model's own .emoe file: f16 experts 1.84 GiB, mwq4 0.76 GiB; "
                  "cgroup cap = budget + 5%)", fontsize=8)
    ax.set_ylabel("decode tokens/s (cold, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"OLMoE-shaped 8-layer MoE, {env['threads']} threads: decode speed vs memory budget", fontsize=9)
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
