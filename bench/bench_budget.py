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
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def storage_bandwidth(path: Path, nbytes: int = 1 << 30, block: int = 4 << 20) -> dict:
    """Cold sequential read bandwidth of `path` (page cache dropped; O_DIRECT when possible, else buffered)."""
    size = path.stat().st_size
    nbytes = min(nbytes, size // block * block)
    dropped = drop_caches()
    buf = mmap.mmap(-1, block)
    direct = hasattr(os, "O_DIRECT")
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), False
    off = (size // 2 - nbytes // 2) // block * block  # the middle of the file: expert data
    t0 = time.perf_counter()
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [buf], off + done)
        if n <= 0:
            break
        done += n
    dt = time.perf_counter() - t0
    os.close(fd)
    buf.close()
    return {"bytes": done, "seconds": dt, "gb_s": done / dt / 1e9, "direct": direct, "cold": dropped,
            "block": block}


def memory_bandwidth() -> float:
    a = np.ones((1 << 30) // 8)
    best = min(_timed(np.sum, a) for _ in range(3))
    return a.nbytes / best / 1e9


def _timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# models

def ensure_models(work: Path, layers: int) -> dict[str, Path]:
    ckpt = Path("/tmp/olmoe8")
    out = {"ckpt": ckpt, "f16": work / "olmoe8_q8f16.emoe", "mwq4": work / "olmoe8_mwq4.emoe",
           "gguf": work / "olmoe8_f16.gguf"}
    env = {**os.environ, "PYTHONPATH": f"{work / 'devpath'}:{ROOT}"}
    (work / "devpath").mkdir(parents=True, exist_ok=True)
    link = work / "devpath" / "edgemoe_export"
    if not link.exists():
        link.symlink_to(ROOT / "export")
    if not (ckpt / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "bench/make_random_model.py"), str(ckpt), "--layers",
                        str(layers)], check=True, env=env)
    jobs = {
        "f16": f"from edgemoe_export import export; export({str(ckpt)!r}, {str(out['f16'])!r}, bits=16, "
               f"dense_bits=8, show_progress=False)",
        "mwq4": f"from edgemoe_export import export; export({str(ckpt)!r}, {str(out['mwq4'])!r}, bits=4, "
                f"base_bits=2, nesting='msb', show_progress=False)",
        "gguf": f"from edgemoe_export.gguf_export import export_gguf; export_gguf({str(ckpt)!r}, "
                f"{str(out['gguf'])!r}, 'F16', show_progress=False, tokenizer='none')",
    }
    for key, code in jobs.items():
        if not out[key].exists():
            print(f"exporting {out[key]} ...", flush=True)
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return out


def prompt_ids(n: int, vocab: int) -> list[int]:
    """Token ids of real text (held-out Shakespeare or the Python docs, the small model's byte-level BPE), so routing
    follows text rather than random ids."""
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


def run_child(cmd: list[str], cg: MemCgroup | None, timeout: float) -> tuple[dict | None, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=cg.preexec() if cg else None)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:.0f} s"
    if p.returncode != 0:
        why = "OOM-killed by the cgroup" if p.returncode in (-9, 137) else f"exit status {p.returncode}"
        return None, f"{why}: {p.stderr.strip()[-400:]}"
    try:
        return json.loads(p.stdout), ""
    except json.JSONDecodeError:
        return None, f"unparsable output: {p.stdout[-300:]} {p.stderr[-300:]}"


def run_edgemoe(model: Path, budget: int | None, mode: str, prefetch: int, args, ids_file: Path,
                cg: MemCgroup | None) -> dict:
    cmd = [str(bench_binary()), str(model), "-p", str(args.prompt), "-n", str(args.n), "-t", str(args.threads),
           "-r", "1", "--prompt-file", str(ids_file), "--tg-prompt", "--json"]
    if budget is not None:
        cmd += ["--budget", str(budget), "--mode", mode, "--prefetch", str(prefetch)]
        if args.direct:
            cmd += ["--direct"]
    out, err = run_child(cmd, cg, args.timeout)
    if out is None:
        return {"error": err}
    tg = next((r for r in out if r["test"].startswith("tg")), None)
    return tg if tg else {"error": "no tg result"}


LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
path, ids, n_gen, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=len(ids) + n_gen + 8, n_threads=threads, n_threads_batch=threads, n_batch=64,
            verbose=False, use_mmap=True, logits_all=False)
load_s = time.perf_counter() - t0
llm.eval(ids)
lat, toks = [], []
for _ in range(n_gen):
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    toks.append(tok)
    t = time.perf_counter()
    llm.eval([tok])
    lat.append(time.perf_counter() - t)
status = open("/proc/self/status").read()
hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"load_s": load_s, "latencies_s": lat, "peak_rss_bytes": hwm, "tokens": toks}))
"""


def run_llama(gguf: Path, ids: list[int], args, cg: MemCgroup | None) -> dict:
    cmd = [sys.executable, "-c", LLAMA_CHILD, str(gguf), json.dumps(ids), str(args.n_llama), str(args.threads)]
    out, err = run_child(cmd, cg, args.timeout)
    if out is None:
        return {"error": err}
    lat = sorted(out["latencies_s"])
    return {"avg_ts": len(lat) / sum(lat), "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p95_ms": 1e3 * float(np.percentile(lat, 95)), "peak_rss_bytes": out["peak_rss_bytes"],
            "n_gen": len(lat), "load_s": out["load_s"]}


def summarize(r: dict) -> dict:
    keys = ("avg_ts", "p50_ms", "p95_ms", "peak_rss_bytes", "bytes_read_per_token", "stall_fraction",
            "cache_hit_rate", "prefetch_recall", "prefetch_precision", "minimum_bytes", "cache_capacity_bytes",
            "error")
    return {k: r.get(k) for k in keys if k in r}


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_DIR)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--budgets", default="100,70,50,35", help="percent of the .emoe file size")
    p.add_argument("-n", type=int, default=24, help="decoded tokens per edgemoe run")
    p.add_argument("--n-llama", type=int, default=12, help="decoded tokens per llama.cpp run")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (real text), prefilled before timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=1, help="interleaved repetitions of every capped run")
    p.add_argument("--direct", action="store_true", help="edgemoe reads with O_DIRECT")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--no-adaptive", action="store_true")
    p.add_argument("--warm", action="store_true", help="also run every configuration warm (no drop_caches)")
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--json", type=Path, default=ROOT / "bench/budget.json")
    p.add_argument("--png", type=Path, default=ROOT / "bench/budget.png")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    models = ensure_models(args.work, args.layers)
    size = models["f16"].stat().st_size
    from edgemoe.container import open_container

    c = open_container(models["f16"], verify=False)
    vocab = c.spec.vocab
    c.close()
    ids = prompt_ids(args.prompt, vocab)
    ids_file = args.work / "prompt_ids.txt"
    ids_file.write_text(" ".join(map(str, ids)))
    no_cg = cgroup_available()
    if no_cg:
        print(f"NOTE: {no_cg}; llama.cpp runs uncapped and is reported as such", flush=True)
    can_drop = drop_caches()
    env = {"cpu": _cpu(), "threads": args.threads, "cgroup": no_cg or "cgroup v1 memory.limit_in_bytes = budget * 1.05",
           "drop_caches": can_drop, "model": str(models["f16"]), "model_bytes": size,
           "gguf": str(models["gguf"]), "gguf_bytes": models["gguf"].stat().st_size,
           "mwq4": str(models["mwq4"]), "mwq4_bytes": models["mwq4"].stat().st_size, "prompt_tokens": len(ids),
           "n_gen": args.n, "n_gen_llama": args.n_llama}
    print("storage bandwidth (cold) ...", flush=True)
    env["storage"] = storage_bandwidth(models["f16"])
    env["memory_gb_s"] = memory_bandwidth()
    print(json.dumps(env, indent=1), flush=True)

    results = []

    def record(system: str, budget_pct, budget, cold: bool, r: dict):
        row = {"system": system, "budget_pct": budget_pct, "budget_bytes": budget, "cold": cold, **summarize(r)}
        results.append(row)
        print(json.dumps(row), flush=True)

    # all-resident reference (no cap): the .emoe mapped, warm
    r = run_edgemoe(models["f16"], None, "exact", 0, args, ids_file, None)
    record("edgemoe all-resident", None, None, False, r)

    budgets = [int(x) for x in args.budgets.split(",")]
    for pct in budgets:
        budget = int(size * pct / 100)
        systems = [("edgemoe exact", models["f16"], "exact", 2), ("edgemoe on-demand LRU", models["f16"], "ondemand", 0)]
        if not args.no_adaptive:
            b4 = int(models["mwq4"].stat().st_size * pct / 100)
            systems += [("edgemoe exact mwq4", models["mwq4"], "exact", 2, b4),
                        ("edgemoe adaptive mwq4", models["mwq4"], "adaptive", 2, b4)]
        if not args.no_llama:
            systems.append(("llama.cpp f16 (mmap)", None, None, None))
        for rep in range(args.reps):
            for sysdef in systems:
                name = sysdef[0]
                b = sysdef[4] if len(sysdef) > 4 else budget
                for cold in ((True, False) if args.warm else (True,)):
                    cg = None if no_cg else MemCgroup(int(b * 1.05), name.split()[0] + str(pct))
                    if cold:
                        drop_caches()
                    try:
                        if name.startswith("llama"):
                            r = run_llama(models["gguf"], ids, args, cg)
                        else:
                            r = run_edgemoe(sysdef[1], b, sysdef[2], sysdef[3], args, ids_file, cg)
                        if cg:
                            r["cgroup_max_usage"] = cg.max_usage()
                    finally:
                        if cg:
                            cg.remove()
                    record(name, pct, b, cold, r)
    env["wall_s"] = time.perf_counter() - t_start
    bw = env["storage"]["gb_s"] * 1e9
    for row in results:  # storage-bandwidth bound: the bytes this run had to read per token at the cold bandwidth
        bpt = row.get("bytes_read_per_token")
        if bpt:
            row["bound_ts"] = bw / bpt
            row["fraction_of_bound"] = row["avg_ts"] / row["bound_ts"] if row.get("avg_ts") else None
    args.json.write_text(json.dumps({"env": env, "results": results}, indent=1))
    print(table(results, env))
    plot(results, args.png, env)
    print(f"wrote {args.json} and {args.png} in {env['wall_s']:.0f} s")
    return 0


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
    lines = ["| system | budget | cold | tok/s | p50 ms | p95 ms | peak RSS / budget | read MB/token | stall | "
             "hit rate | prefetch recall | bound tok/s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["system"], r["budget_pct"], r["cold"]), []).append(r)

    def f(v, fmt):
        return "" if v is None else fmt.format(v)

    for (system, pct, cold), rows in groups.items():
        err = next((r["error"] for r in rows if r.get("error")), None)
        rss, b = _agg(rows, "peak_rss_bytes"), rows[0]["budget_bytes"]
        rss_s = f(rss, "{:.2f} GiB").strip() + (f" / {b / gib:.2f} ({rss / b:.2f}x)" if b and rss else "")
        bpt = _agg(rows, "bytes_read_per_token")
        lines.append(
            f"| {system} | {'-' if pct is None else f'{pct}%'} | {'cold' if cold else 'warm'} | "
            f"{f(_agg(rows, 'avg_ts'), '{:.2f}') if not err else 'failed: ' + err[:60]} | "
            f"{f(_agg(rows, 'p50_ms'), '{:.0f}')} | {f(_agg(rows, 'p95_ms'), '{:.0f}')} | {rss_s} | "
            f"{f(bpt / 1e6 if bpt else None, '{:.0f}')} | {f(_agg(rows, 'stall_fraction'), '{:.0%}')} | "
            f"{f(_agg(rows, 'cache_hit_rate'), '{:.0%}')} | {f(_agg(rows, 'prefetch_recall'), '{:.0%}')} | "
            f"{f(_agg(rows, 'bound_ts'), '{:.1f}')} |")
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
    ax.set_xlabel("memory budget (% of the .emoe file; cgroup cap = budget + 5%)")
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
