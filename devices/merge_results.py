#!/usr/bin/env python3
"""Merge benchmark results from any device into one markdown table and, if matplotlib is installed, a PNG plot.

    python devices/merge_results.py results/ [more files or dirs ...] [--out table.md] [--plot results.png]

Inputs are JSON files as written by `edgemoe-bench --json` (a list with one object per test), by the ssh / adb
runners (the same objects plus "device" and "command"), or by `edgemoe bench --json` in Python (objects with the
same core fields: engine, test, n_prompt, n_gen, n_threads, samples_ts, avg_ts, stddev_ts). Directories are searched
for *.json recursively. Only the Python standard library is needed (matplotlib only for --plot).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REQUIRED = ("test", "n_threads", "avg_ts")


class ResultError(ValueError):
    pass


def _records_of(obj, source: str) -> list[dict]:
    if isinstance(obj, dict) and isinstance(obj.get("results"), list):  # {"results": [...], ...} wrappers
        obj = obj["results"]
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        raise ResultError(f"{source}: expected a JSON list of result objects, got {type(obj).__name__}")
    out = []
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise ResultError(f"{source}: entry {i} is not an object")
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise ResultError(f"{source}: entry {i} lacks {', '.join(missing)} (not an edgemoe-bench result?)")
        r = dict(r)
        r.setdefault("source_file", source)
        out.append(r)
    return out


def parse_results(text: str, source: str = "<string>") -> list[dict]:
    """Result records from the JSON text one run printed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultError(f"{source}: not JSON ({e}); did the benchmark fail? its output starts: {text[:200]!r}")
    return _records_of(obj, source)


def load_results(paths) -> list[dict]:
    """Every record of every JSON file in `paths` (files or directories, searched recursively), in path order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise ResultError(f"{p}: no such file or directory")
    records = []
    for f in files:
        records += parse_results(f.read_text(), str(f))
    return records


def device_of(r: dict) -> str:
    return str(r.get("device") or r.get("hostname") or r.get("cpu_info") or "?")


def budget_of(r: dict) -> str:
    b = r.get("budget_bytes")
    if b is None:
        return "none"
    s = _format_bytes(b)
    return s if r.get("budget_enforced") else s + " (not enforced)"


def _format_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def sort_key(r: dict):
    test = str(r["test"])
    return (device_of(r), Path(str(r.get("model_filename", ""))).name, test[:2], int(r["n_threads"]),
            str(r.get("budget_bytes") or 0), test)


def markdown_table(records: list[dict]) -> str:
    lines = [
        "| device | model | isa | threads | budget | test | t/s | p50 ms | p95 ms | peak RSS |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(records, key=sort_key):
        ts = f"{r['avg_ts']:.2f} ± {r.get('stddev_ts') or 0:.2f}"
        rss = r.get("peak_rss_bytes")
        lines.append(
            f"| {device_of(r)} | {Path(str(r.get('model_filename', '?'))).name} | {r.get('isa', '')} | "
            f"{r['n_threads']} | {budget_of(r)} | {r['test']} | {ts} | {_fmt(r.get('p50_ms'), '.3f')} | "
            f"{_fmt(r.get('p95_ms'), '.3f')} | {'' if rss is None else _format_bytes(rss)} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], path: str | Path) -> bool:
    """One bar chart per test kind (pp, tg): tokens/s per device/threads/budget with the sd as error bars.
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = sorted({str(r["test"])[:2] for r in records})
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 3.5 * max(1, len(kinds))), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        rs = sorted((r for r in records if str(r["test"]).startswith(kind)), key=sort_key)
        labels = [f"{device_of(r)}\n{r['test']} t{r['n_threads']} {budget_of(r)}" for r in rs]
        ax.bar(range(len(rs)), [r["avg_ts"] for r in rs], yerr=[r.get("stddev_ts") or 0 for r in rs], capsize=3)
        ax.set_xticks(range(len(rs)), labels, fontsize=7)
        ax.set_ylabel("tokens/s")
        ax.set_title({"pp": "prompt processing", "tg": "generation"}.get(kind, kind))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="JSON result files or directories")
    ap.add_argument("--out", help="write the markdown table here (default: print it)")
    ap.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib)")
    args = ap.parse_args(argv)
    try:
        records = load_results(args.inputs)
    except ResultError as e:
        print(f"merge_results: {e}", file=sys.stderr)
        return 1
    if not records:
        print("merge_results: no results found", file=sys.stderr)
        return 1
    table = markdown_table(records)
    if args.out:
        Path(args.out).write_text(table + "\n")
        print(f"wrote {args.out} ({len(records)} results)")
    else:
        print(table)
    if args.plot:
        if plot(records, args.plot):
            print(f"wrote {args.plot}")
        else:
            print("merge_results: matplotlib is not installed; no plot (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
