"""Any model at real widths (random weights, reduced depth: bench/make_random_checkpoint.py --preset NAME, exported
with edgemoe export or to GGUF) decoded under a memory budget: tok/s, peak RSS, bytes read per token. Run it in a
fresh process per budget (peak RSS is the process's). Written for gpt-oss, used for every family since.

    python bench/bench_real_decode.py MODEL.emoe --budget-frac 0.5 [-n 16] [--prompt 16] [--threads 2]
    python bench/bench_real_decode.py MODEL.gguf          # the same with llama.cpp (llama-cpp-python), resident
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--budget-frac", type=float, default=0.5, help="budget = this fraction of the file size (0 = none)")
    p.add_argument("-n", type=int, default=16, help="decoded tokens")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (random ids)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-ctx", type=int, default=256)
    args = p.parse_args(argv)
    if args.model.endswith(".gguf"):
        return run_llama_cpp(args)
    import edgemoe

    size = os.path.getsize(args.model)
    budget = int(size * args.budget_frac) if args.budget_frac > 0 else None
    t0 = time.perf_counter()
    m = edgemoe.load(args.model, memory_budget=budget, max_ctx=args.max_ctx, threads=args.threads)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, m.config["vocab"] if isinstance(m.config, dict) else 1000,
                                            args.prompt).tolist()
    t0 = time.perf_counter()
    logits = m._engine.prefill(ids)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.n):
        logits = m._engine.decode(int(np.argmax(logits)))
    decode_s = time.perf_counter() - t0
    st = m.stats
    out = {"file_bytes": size, "budget_bytes": budget, "engine": m.engine_name, "load_s": round(load_s, 2),
           "prefill_tok_s": round(args.prompt / prefill_s, 3), "decode_tok_s": round(args.n / decode_s, 3),
           "peak_rss_bytes": peak_rss_bytes(), "bytes_read_per_token": st.get("bytes_read_per_token"),
           "threads": args.threads, "prompt": args.prompt, "n": args.n}
    m.close()
    print(json.dumps(out))


def run_llama_cpp(args) -> None:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=args.model, n_ctx=args.max_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, llm.n_vocab(), args.prompt).tolist()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.n):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode_s = time.perf_counter() - t0
    print(json.dumps({"file_bytes": os.path.getsize(args.model), "engine": "llama.cpp", "load_s": round(load_s, 2),
                      "prefill_tok_s": round(args.prompt / prefill_s, 3), "decode_tok_s": round(args.n / decode_s, 3),
                      "peak_rss_bytes": peak_rss_bytes(), "threads": args.threads, "prompt": args.prompt,
                      "n": args.n}))
    llm.close()


if __name__ == "__main__":
    main()
