"""Under a memory budget with the options a user gets: `edgemoe run --budget B` (no tuning flags) vs llama.cpp, each in
a memory cgroup capped at the budget + the process overhead measured for that model (issue 16).

bench_budget.py measures the engine (edgemoe-bench, the C program, tuned options); this measures what a user meets:
the Python CLI with its defaults (exact mode, O_DIRECT reads where the file system allows them, the default threads
and context), f16 experts and MWQ experts at all planes and at --precision 3, cold (page cache dropped before each
run). The process overhead is what the process holds beyond the budget (peak RSS of an uncapped run with the same
budget, minus the budget: the interpreter, NumPy, the tokenizer); the cap is the budget plus that, for edgemoe and
llama.cpp alike. llama.cpp runs its mmap default and thrashes once the file does not fit.

    python bench/bench_budget_defaults.py --emoe f16=/tmp/vs/f16.emoe --emoe mwq=/tmp/vs/mwq5.emoe \
        --gguf f16=/tmp/vs/f16.gguf --gguf mwq=/tmp/vs/q4_0_q8_0.gguf --budgets 50 --reps 2 --json out.json

Root is needed for the cgroup and to drop the page cache. Models: bench_vs_llama.py's exports of one checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_budget as B  # the cgroup, page-cache and llama.cpp helpers

from edgemoe.container import open_container  # bench_budget put the checkout on sys.path

PROMPT_CHARS = 400

# llama.cpp as a memory-limited user runs it: weights mmapped, no repacked copies (use_extra_bufts would copy the
# Q4_0 / Q8_0 weights into anonymous memory, which no cap below the file size holds; it is also the switch that keeps
# this VM's unusable AMX kernels off)
NO_EXTRA_BUFTS = """
import llama_cpp.llama_cpp as _lib  # the module Llama() takes its default model parameters from
_default = _lib.llama_model_default_params
def _plain():
    p = _default()
    p.use_extra_bufts = False
    return p
_lib.llama_model_default_params = _plain
"""
LLAMA_CHILD = B.LLAMA_CHILD.replace("from llama_cpp import Llama\n", "from llama_cpp import Llama\n" + NO_EXTRA_BUFTS)
assert LLAMA_CHILD != B.LLAMA_CHILD
B.LLAMA_CHILD = LLAMA_CHILD


def run_cli(model: Path, budget: int | None, precision: int | None, prompt: str, n: int, cg, timeout: float) -> dict:
    """`edgemoe run MODEL --budget B -p PROMPT -n N --json` with nothing else but --precision: stats or error.
    budget None: the all-resident run (the file mapped), the compute ceiling."""
    cmd = [sys.executable, "-P", "-m", "edgemoe", "run", str(model), "-p", prompt, "-n", str(n), "--json"]
    cmd += (["--budget", str(budget)] if budget else []) + (["--precision", str(precision)] if precision else [])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=cg.preexec() if cg else None, env=B.child_env(Path("/tmp/budget_defaults")))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if p.returncode != 0:
        why = "OOM-killed by the cgroup" if p.returncode in (-9, 137) else f"exit status {p.returncode}"
        return {"error": f"{why}: {p.stderr.strip()[-300:]}"}
    s = json.loads(p.stdout)["stats"]
    return {"avg_ts": s["decode_tok_s"], "peak_rss_bytes": s["peak_rss_bytes"], "wall_s": time.perf_counter() - t0,
            "bytes_read_per_token": s.get("bytes_read_per_token"), "cache_hit_rate": s.get("cache_hit_rate"),
            "read_mode": s.get("read_mode"), "io_stall_fraction": s.get("io_stall_fraction"),
            "expert_planes": s.get("expert_planes"), "n_gen": s["decode_tokens"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emoe", action="append", required=True, metavar="KEY=PATH", help="f16=... and/or mwq=...")
    ap.add_argument("--gguf", action="append", default=[], metavar="KEY=PATH", help="llama.cpp's file per KEY")
    ap.add_argument("--budgets", default="50", help="percent of each .emoe file")
    ap.add_argument("-n", type=int, default=32, help="decoded tokens (edgemoe)")
    ap.add_argument("--n-llama", type=int, default=8, help="decoded tokens (llama.cpp, slow when it thrashes)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens for llama.cpp (edgemoe gets the same text)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    emoe = dict(kv.split("=", 1) for kv in args.emoe)
    gguf = dict(kv.split("=", 1) for kv in args.gguf)
    why = B.cgroup_available()
    if why:
        raise SystemExit(f"bench_budget_defaults: {why} (needs root and cgroup v1)")
    text = B.ROOT / "export/assets/small-moe/heldout/shakespeare.txt"
    prompt = text.read_text(encoding="utf-8")[:PROMPT_CHARS] if text.exists() else "To be, or not to be. " * 20
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    first = Path(next(iter(emoe.values())))
    storage = B.storage_bandwidth(first, 1 << 30, threads=2)
    print(f"storage: {storage['gb_s']:.2f} GB/s cold ({'O_DIRECT' if storage['direct'] else 'buffered'}, 2 readers); "
          f"load {' '.join(load0)}", flush=True)
    rows = []
    for pct in [int(x) for x in args.budgets.split(",")]:
        for key, path in emoe.items():
            path = Path(path)
            budget = int(path.stat().st_size * pct / 100)
            c = open_container(path, verify=False)
            vocab = c.spec.vocab
            c.close()
            systems = [(f"edgemoe {key}", None)] + ([(f"edgemoe {key} --precision 3", 3)] if key.startswith("mwq")
                                                     else [])
            for name, prec in systems:
                r = run_cli(path, None, prec, prompt, args.n, None, args.timeout)  # the compute ceiling
                ceiling = r.get("avg_ts")
                rows.append({"system": f"{name}, all-resident (no budget, no cap)", "budget_pct": 100,
                             "budget_bytes": path.stat().st_size, **r})
                print(json.dumps(rows[-1]), flush=True)
                B.drop_caches()
                probe = run_cli(path, budget, prec, prompt, 4, None, args.timeout)  # uncapped: the overhead
                if "error" in probe:
                    rows.append({"system": name, "budget_pct": pct, "budget_bytes": budget, **probe})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                overhead = max(0, probe["peak_rss_bytes"] - budget)
                cap = budget + overhead
                runs = []
                for _ in range(args.reps):
                    cg = B.MemCgroup(cap, f"d{pct}{key}{prec or ''}")
                    B.drop_caches()
                    try:
                        r = run_cli(path, budget, prec, prompt, args.n, cg, args.timeout)
                        r["cgroup_max_usage"] = cg.max_usage()
                    finally:
                        cg.remove()
                    runs.append(r)
                    if key in gguf:  # interleaved: llama.cpp under the same cap right after
                        ids = B.prompt_ids(args.prompt + args.n_llama + 1, vocab)
                        cg = B.MemCgroup(cap, f"l{pct}{key}")
                        B.drop_caches()
                        try:
                            lr = B.run_llama(Path(gguf[key]), ids, args, cg)
                            lr["cgroup_max_usage"] = cg.max_usage()
                        finally:
                            cg.remove()
                        rows.append({"system": f"llama.cpp {Path(gguf[key]).name}", "pair": name, "budget_pct": pct,
                                     "budget_bytes": budget, "cap_bytes": cap, **lr})
                        print(json.dumps(rows[-1]), flush=True)
                ok = [r for r in runs if "error" not in r]
                row = {"system": name, "budget_pct": pct, "budget_bytes": budget, "cap_bytes": cap,
                       "overhead_bytes": overhead, "runs": runs,
                       "avg_ts": statistics.median(r["avg_ts"] for r in ok) if ok else None}
                if ok:
                    bpt = statistics.median(r["bytes_read_per_token"] or 0 for r in ok)
                    row["bytes_read_per_token"] = bpt
                    row["storage_bound_ts"] = storage["gb_s"] * 1e9 / bpt if bpt else None
                    # the bound a run can reach: the storage's, or the all-resident speed where that is lower
                    # (bench_budget.py's definition)
                    row["bound_ts"] = min(x for x in (row["storage_bound_ts"], ceiling) if x) if bpt else ceiling
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    out = {"storage": storage, "load_start": load0, "load_end": Path("/proc/loadavg").read_text().split()[:3],
           "threads": args.threads, "n": args.n, "n_llama": args.n_llama, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    head = "system | budget | cap | tok/s | storage bound tok/s | of it | of min(storage, resident) | MB read/token"
    lines = [f"| {head} | peak / cap |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ts, bound, cap = r.get("avg_ts"), r.get("storage_bound_ts"), r.get("cap_bytes")
        both = r.get("bound_ts")
        peak = max((x.get("cgroup_max_usage") or 0) for x in (r.get("runs") or [r]))
        cells = [r["system"], f"{r['budget_pct']}% ({r['budget_bytes'] / 1e6:.0f} MB)",
                 f"{cap / 1e6:.0f} MB" if cap else "",
                 f"{ts:.2f}" if ts is not None else r.get("error", "error")[:80],
                 f"{bound:.2f}" if bound else "", f"{ts / bound:.0%}" if bound and ts else "",
                 f"{ts / both:.0%}" if both and ts and bound else "",
                 f"{r['bytes_read_per_token'] / 1e6:.1f}" if r.get("bytes_read_per_token") else "",
                 f"{peak / cap:.2f}" if cap and peak else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
