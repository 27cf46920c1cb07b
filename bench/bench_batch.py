"""Batch decoding under a memory budget: aggregate decode tokens/s and bytes read per generated token at batch sizes
1, 2, 4, 8 (issue 6: "batch decoding of several sequences shares each loaded expert").

The random-weight OLMoE-shaped model of bench_budget.py (hidden 2048, 8 layers, 16 experts top-4, Q8_0 dense + f16
experts; made there if missing) under a budget of a fraction of its file. The same 8 sequences are decoded at every
batch size: each starts with its own slice of held-out text (the prompt) and is then fed the slice's next tokens one
at a time (teacher forcing, as bench_budget.py's --tg-text: routing follows real text; greedy decoding of a random
model would loop). Batch b decodes the 8 sequences in groups of b, one emoe_forward_batch per step of a group, so
every expert a step's tokens route to is read and run once for the group. The model is opened with n_seq = 8 at
every batch size, so the budget (which holds the KV cache of all 8) and the expert cache are the same for all.
Only decode steps are timed and counted (prefills are excluded from both figures); reads are O_DIRECT; each batch
size starts from a cold expert cache. Batch sizes run interleaved over repetitions (1 2 4 8 1 2 4 8 ...), the median
per batch size is reported.

    python bench/bench_batch.py [--model PATH] [--budget-pct 50] [--batches 1,2,4,8] [--n-seq N] [-n 16] [--prompt 32]
        [--threads 2] [--reps 2] [--json bench/batch.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

def run(path: Path, budget: int, batch: int, texts: list[list[int]], n_prompt: int, n_gen: int, threads: int) -> dict:
    from edgemoe.container import open_container
    from edgemoe.engine_c import CEngine

    c = open_container(path, verify=False)
    spec = c.spec
    c.close()
    n_seq = len(texts)
    eng = CEngine.open_streaming(path, spec, budget, "exact", threads=threads, max_ctx=n_prompt + n_gen + 1,
                                 direct=True, n_seq=n_seq)
    try:
        decode_s, bytes_read, demand, tokens, stall = 0.0, 0, 0, 0, 0.0
        for lo in range(0, n_seq, batch):
            seqs = list(range(lo, min(lo + batch, n_seq)))
            for s in seqs:
                eng.prefill(texts[s][:n_prompt], seq=s)
            before = eng.stats()
            t0 = time.perf_counter()
            for step in range(n_gen):
                eng.decode_batch([texts[s][n_prompt + step] for s in seqs], seqs)
            decode_s += time.perf_counter() - t0
            after = eng.stats()
            bytes_read += after["bytes_read"] - before["bytes_read"]
            demand += after["demand_bytes"] - before["demand_bytes"]
            tokens += after["tokens"] - before["tokens"]
            stall += after["stall_s"] - before["stall_s"]
        st = eng.stats()
        assert tokens == n_seq * n_gen, (tokens, n_seq * n_gen)
        return {"batch": batch, "tok_s": tokens / decode_s, "mb_read_per_token": bytes_read / tokens / 1e6,
                "mb_demand_per_token": demand / tokens / 1e6, "stall_fraction": stall / decode_s,
                "decode_s": decode_s, "tokens": tokens, "budget_bytes": budget, "kv_bytes": st["kv_bytes"],
                "expert_cache_bytes": st["cache_capacity_bytes"]}
    finally:
        eng.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="an .emoe (default: bench_budget.py's OLMoE-shaped f16-expert model in /tmp/budget)")
    p.add_argument("--budget-pct", type=float, default=50.0, help="budget as %% of the .emoe file size")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--n-seq", type=int, default=None, help="sequences decoded at every batch size (default: the "
                   "largest batch)")
    p.add_argument("-n", "--n-gen", type=int, default=16, help="decode steps per sequence")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import bench_budget as B

    path = args.model
    if path is None:
        path = B.ensure_models(B.DEFAULT_DIR, 8)["f16"]
    from edgemoe.container import open_container

    c = open_container(path, verify=False)
    vocab = c.spec.vocab
    c.close()
    batches = [int(b) for b in args.batches.split(",")]
    n_seq = args.n_seq or max(batches)
    per = args.prompt + args.n_gen
    ids = B.prompt_ids(n_seq * per + 1000, vocab)
    if len(ids) < n_seq * per:
        raise SystemExit(f"only {len(ids)} tokens of text for {n_seq} sequences of {per}")
    texts = [ids[i * per:(i + 1) * per] for i in range(n_seq)]  # different passages
    budget = int(path.stat().st_size * args.budget_pct / 100)
    runs: dict[int, list[dict]] = {b: [] for b in batches}
    for rep in range(args.reps):
        for b in batches:
            r = run(path, budget, b, texts, args.prompt, args.n_gen, args.threads)
            runs[b].append(r)
            print(f"rep {rep} batch {b}: {r['tok_s']:.2f} tok/s, {r['mb_read_per_token']:.1f} MB read/token "
                  f"({r['mb_demand_per_token']:.1f} on demand), stall {r['stall_fraction']:.2f}", flush=True)
    rows = []
    for b in batches:
        rs = runs[b]
        rows.append({"batch": b, "tok_s": statistics.median(r["tok_s"] for r in rs),
                     "tok_s_all": [round(r["tok_s"], 2) for r in rs],
                     "mb_read_per_token": statistics.median(r["mb_read_per_token"] for r in rs),
                     "mb_demand_per_token": statistics.median(r["mb_demand_per_token"] for r in rs),
                     "stall_fraction": statistics.median(r["stall_fraction"] for r in rs)})
    r0 = runs[batches[0]][0]
    print(f"\n{path.name} ({path.stat().st_size / 2**30:.2f} GiB), budget {args.budget_pct:g}% = "
          f"{budget / 2**20:.0f} MiB (KV for {n_seq} sequences {r0['kv_bytes'] / 2**20:.1f} MiB, expert cache "
          f"{r0['expert_cache_bytes'] / 2**20:.0f} MiB), {args.threads} threads, {n_seq} sequences x {args.n_gen} "
          f"decode steps after {args.prompt}-token prompts, median of {args.reps}")
    print("| batch | decode tok/s (aggregate) | MB read per generated token | of which on demand | I/O stall |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['tok_s']:.2f} ({', '.join(map(str, r['tok_s_all']))}) | "
              f"{r['mb_read_per_token']:.1f} | {r['mb_demand_per_token']:.1f} | {r['stall_fraction']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(path), "budget_bytes": budget, "budget_pct": args.budget_pct,
                                         "threads": args.threads, "n_seq": n_seq, "n_gen": args.n_gen,
                                         "prompt": args.prompt, "rows": rows,
                                         "runs": {str(b): v for b, v in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
