"""`edgemoe serve` under concurrent clients: aggregate decode tokens/s, time to first token and per-token latency
(p50 / p95), and bytes read per generated token, with 1, 2, 4, 8 clients against one server (issue 17).

A random-weight OLMoE-shaped model of moderate size (made here with bench/make_random_model.py and exported with
Q8_0 dense + f16 experts if missing; speed does not depend on weight values) is served under a memory budget of a
fraction of its file (default 50 %) with --n-seq = the most clients. Each client sends `--requests` streaming
/v1/completions requests one after another, each a prompt of random token ids (its own) and -n new tokens
(end-of-sequence banned with logit_bias, so every request generates exactly -n). Measured in the client: time to the
first token, the gaps between tokens, and the phase's wall time (aggregate tok/s = all generated tokens / wall time,
prefills included). Bytes read: the server process's read() bytes (/proc/PID/io rchar) over the phase, per generated
token (expert reads dominate; HTTP bodies are a few hundred bytes). A warm-up request precedes the phases.

    python bench/bench_serve.py [--model PATH] [--work /tmp/serve_bench] [--clients 1,2,4,8] [--requests 2] [-n 32]
        [--prompt 32] [--budget-pct 50] [--threads 2] [--json bench/serve.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["--layers", "8", "--hidden", "1024", "--heads", "8", "--experts", "16", "--top-k", "4", "--expert-ffn", "512",
         "--vocab", "16384"]


def make_model(work: Path) -> Path:
    out = work / "olmoe8_h1024_q8f16.emoe"
    if not out.exists():
        ckpt = work / "hf"
        subprocess.run([sys.executable, str(ROOT / "bench/make_random_model.py"), str(ckpt), *SHAPE], check=True)
        subprocess.run([sys.executable, "-m", "edgemoe", "export", str(ckpt), "-o", str(out), "--bits", "16",
                        "--dense-bits", "8", "-q"], check=True)
    return out


def rchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/PID/io")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def one_request(httpx, base: str, prompt: list[int], n: int, eos: int) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "logit_bias": {str(eos): -100}}
    t0 = time.perf_counter()
    times = []
    with httpx.stream("POST", base + "/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    return {"ttft": times[0] - t0, "gaps": [b - a for a, b in itertools.pairwise(times)], "tokens": len(times)}


def phase(httpx, base: str, pid: int, clients: int, requests: int, n: int, n_prompt: int, vocab: int, eos: int,
          seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [[[int(t) for t in rng.integers(3, vocab, n_prompt)] for _ in range(requests)] for _ in range(clients)]
    results: list[dict] = []
    lock = threading.Lock()

    def client(i):
        for p in prompts[i]:
            r = one_request(httpx, base, p, n, eos)
            with lock:
                results.append(r)

    r0 = rchar(pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    read = rchar(pid) - r0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "token_p50_s": pct(gaps, 50),
            "token_p95_s": pct(gaps, 95), "bytes_read_per_token": read / tokens}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/serve_bench"))
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("-n", type=int, default=32, help="new tokens per request")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--budget-pct", type=float, default=50, help="memory budget, %% of the file (0 = none: resident)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import httpx

    sys.path.insert(0, str(ROOT))
    from edgemoe.container import open_container
    from edgemoe.units import format_bytes

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or make_model(args.work)
    c = open_container(model, verify=False)
    vocab, eos = c.spec.vocab, c.spec.eos_token_id
    c.close()
    size = model.stat().st_size
    budget = int(size * args.budget_pct / 100) or None
    clients = [int(x) for x in args.clients.split(",")]
    cmd = [sys.executable, "-m", "edgemoe", "serve", str(model), "--port", "0", "--model-name", "m", "--n-seq",
           str(max(clients)), "--threads", str(args.threads), "--max-ctx", str(args.prompt + args.n + 8)]
    cmd += ["--budget", str(budget)] if budget else []
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if "http://" not in line:
            raise SystemExit(f"the server did not start: {line}")
        print(line.strip(), file=sys.stderr)
        base = line.split("on ")[-1].strip()
        one_request(httpx, base, list(range(3, 3 + args.prompt)), args.n, eos)  # warm-up
        rows = []
        for i, k in enumerate(clients):
            r = phase(httpx, base, server.pid, k, args.requests, args.n, args.prompt, vocab, eos, seed=i)
            rows.append(r)
            print(f"{k} clients: {r['tok_s']:.2f} tok/s aggregate, TTFT p50 {r['ttft_p50_s']:.2f} s p95 "
                  f"{r['ttft_p95_s']:.2f} s, per token p50 {r['token_p50_s'] * 1e3:.0f} ms p95 "
                  f"{r['token_p95_s'] * 1e3:.0f} ms, {format_bytes(r['bytes_read_per_token'])} read/token",
                  file=sys.stderr)
        health = httpx.get(base[:-3] + "/health").json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    out = {"model": model.name, "file_bytes": size, "budget_bytes": budget, "n_seq": max(clients),
           "threads": args.threads, "n_gen": args.n, "n_prompt": args.prompt, "requests_per_client": args.requests,
           "peak_batch": health["peak_batch"], "rows": rows}
    print("| clients | aggregate tok/s | vs 1 client | TTFT p50 / p95 | per token p50 / p95 | read per token |")
    print("|---:|---:|---:|---|---|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['tok_s']:.2f} | {r['tok_s'] / rows[0]['tok_s']:.2f}x | "
              f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} s | {r['token_p50_s'] * 1e3:.0f} / "
              f"{r['token_p95_s'] * 1e3:.0f} ms | {format_bytes(r['bytes_read_per_token'])} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
