"""`edgemoe serve` under concurrent clients: aggregate decode tokens/s, time to first token and per-token latency
(p50 / p95), and bytes read per generated token, with 1, 2, 4, 8 clients against one server (issue 17).

A random-weight OLMoE-shaped model of moderate size (8 layers, hidden 1024, 16 experts top-4, expert ffn 512, the
shipped small model's 4096-token byte-level BPE tokenizer; made here with bench/make_random_model.py and exported with
Q8_0 dense + f16 experts if missing; speed does not depend on weight values) is served under a memory budget of a
fraction of its file (default 50 %; 0 = none, the file mapped) with --n-seq = the most clients. Each client sends
`--requests` streaming /v1/completions requests one after another, each its own --prompt tokens of held-out text
(Shakespeare) and -n new tokens (end-of-sequence banned with logit_bias, so every request generates exactly -n).
Measured in the client: time to the first token, the gaps between tokens, and the phase's wall time (aggregate tok/s
= all generated tokens / wall time, prefills included). Bytes read: the server process's read() bytes
(/proc/PID/io rchar) over the phase, per generated token (expert reads; a mapped file reads none this way). A
warm-up request precedes the phases; client counts run interleaved over --reps (1 2 4 8 1 2 4 8 ...), the median
tok/s and bytes per token and the latency percentiles over all requests are reported.

--vs-llama-cpp: the same phases against llama-cpp-python's OpenAI server (`python -m llama_cpp.server`, one request
at a time: it has no batching across requests) on an F16 GGUF of the same checkpoint, no budget (it has none).

    python bench/bench_serve.py [--model PATH] [--work /tmp/serve_bench] [--clients 1,2,4,8] [--requests 2] [-n 32]
        [--prompt 32] [--budget-pct 50] [--threads 2] [--reps 1] [--vs-llama-cpp] [--json bench/serve.json]
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
ASSETS = ROOT / "export/assets/small-moe"
SHAPE = ["--layers", "8", "--hidden", "1024", "--heads", "8", "--experts", "16", "--top-k", "4", "--expert-ffn", "512",
         "--vocab", "4096", "--tokenizer", str(ASSETS / "tokenizer.json")]


def make_model(work: Path, gguf: bool) -> tuple[Path, Path | None]:
    """The checkpoint's .emoe (Q8_0 dense + f16 experts) and, when asked, its F16 GGUF (made once, kept in work)."""
    ckpt, out, g = work / "hf_v4096", work / "olmoe8_h1024_v4096_q8f16.emoe", work / "olmoe8_h1024_v4096_f16.gguf"
    if not (ckpt / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "bench/make_random_model.py"), str(ckpt), *SHAPE], check=True)
    if not out.exists():
        subprocess.run([sys.executable, "-m", "edgemoe", "export", str(ckpt), "-o", str(out), "--bits", "16",
                        "--dense-bits", "8", "-q"], check=True)
    if gguf and not g.exists():
        from edgemoe_export.gguf_export import export_gguf

        export_gguf(ckpt, g, "F16", show_progress=False)
    return out, (g if gguf else None)


def prompts_text(tokenizer, n_prompts: int, n_tokens: int) -> list[str]:
    """n_prompts passages of held-out text, n_tokens each (as text: both servers tokenize it)."""
    ids = tokenizer.encode((ASSETS / "heldout/shakespeare.txt").read_text(encoding="utf-8"))
    return [tokenizer.decode(ids[i * n_tokens:(i + 1) * n_tokens]) for i in range(n_prompts)]


def rchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/PID/io")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def one_request(httpx, base: str, prompt: str, n: int, eos: int) -> dict:
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


def phase(httpx, base: str, pid: int, clients: int, requests: int, n: int, texts: list[str], eos: int) -> dict:
    prompts = [texts[i * requests:(i + 1) * requests] for i in range(clients)]
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
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "read": read,
            "results": results}


def summary(runs: list[dict]) -> dict:
    """One client count over its repetitions: median tok/s and bytes/token, latency percentiles over all requests."""
    ttft = [r["ttft"] for run in runs for r in run["results"]]
    gaps = [g for run in runs for r in run["results"] for g in r["gaps"]]
    return {"clients": runs[0]["clients"], "reps": len(runs), "requests": sum(len(r["results"]) for r in runs),
            "tok_s": float(np.median([r["tok_s"] for r in runs])), "tok_s_runs": [r["tok_s"] for r in runs],
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "token_p50_s": pct(gaps, 50),
            "token_p95_s": pct(gaps, 95),
            "bytes_read_per_token": float(np.median([r["read"] / r["tokens"] for r in runs]))}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_edgemoe(model: Path, budget: int | None, args, n_seq: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edgemoe", "serve", str(model), "--port", "0", "--model-name", "m", "--n-seq",
           str(n_seq), "--threads", str(args.threads), "--max-ctx", str(2 * args.prompt + args.n + 8)]
    cmd += ["--budget", str(budget)] if budget else []
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if "http://" not in line:
        server.kill()
        raise SystemExit(f"the server did not start: {line}")
    print(line.strip(), file=sys.stderr)
    return server, line.split("on ")[-1].strip()


def start_llama(httpx, gguf: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
           "--n_ctx", str(2 * args.prompt + args.n + 8), "--interrupt_requests", "False", "--model_alias", "m"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/models", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("llama_cpp.server did not start")


def run_server(httpx, name: str, server: subprocess.Popen, base: str, args, clients: list[int], texts: list[str],
               eos: int) -> list[dict]:
    from edgemoe.units import format_bytes

    try:
        one_request(httpx, base, texts[-1], args.n, eos)  # warm-up
        runs: dict[int, list[dict]] = {k: [] for k in clients}
        for _ in range(args.reps):
            for k in clients:
                runs[k].append(phase(httpx, base, server.pid, k, args.requests, args.n, texts, eos))
        rows = [summary(runs[k]) for k in clients]
        for r in rows:
            print(f"{name}, {r['clients']} clients: {r['tok_s']:.2f} tok/s aggregate, TTFT p50 {r['ttft_p50_s']:.2f} "
                  f"s p95 {r['ttft_p95_s']:.2f} s, per token p50 {r['token_p50_s'] * 1e3:.0f} ms p95 "
                  f"{r['token_p95_s'] * 1e3:.0f} ms, {format_bytes(r['bytes_read_per_token'])} read/token",
                  file=sys.stderr)
        return rows
    finally:
        server.terminate()
        server.wait(timeout=60)


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
    p.add_argument("--reps", type=int, default=1, help="interleaved repetitions of the client counts")
    p.add_argument("--vs-llama-cpp", action="store_true", help="also llama_cpp.server on an F16 GGUF")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import httpx

    sys.path.insert(0, str(ROOT))
    from edgemoe.container import open_container
    from edgemoe.tokenizer import Tokenizer
    from edgemoe.units import format_bytes

    args.work.mkdir(parents=True, exist_ok=True)
    model, gguf = (args.model, None) if args.model else make_model(args.work, args.vs_llama_cpp)
    c = open_container(model, verify=False)
    eos, tok = c.spec.eos_token_id, Tokenizer(c.blob("tokenizer.json"))
    c.close()
    size = model.stat().st_size
    budget = int(size * args.budget_pct / 100) or None
    clients = [int(x) for x in args.clients.split(",")]
    texts = prompts_text(tok, max(clients) * args.requests + 1, args.prompt)
    out = {"model": model.name, "file_bytes": size, "budget_bytes": budget, "n_seq": max(clients),
           "threads": args.threads, "n_gen": args.n, "n_prompt": args.prompt, "requests_per_client": args.requests,
           "reps": args.reps, "servers": {}}
    server, base = start_edgemoe(model, budget, args, max(clients))
    out["servers"]["edgemoe"] = run_server(httpx, "edgemoe", server, base, args, clients, texts, eos)
    if gguf is not None:
        server, base = start_llama(httpx, gguf, args)
        out["servers"]["llama_cpp.server"] = run_server(httpx, "llama_cpp.server", server, base, args, clients, texts,
                                                        eos)
    print("| server | clients | aggregate tok/s | vs 1 client | TTFT p50 / p95 | per token p50 / p95 | read per token |")
    print("|---|---:|---:|---:|---|---|---:|")
    for name, rows in out["servers"].items():
        for r in rows:
            print(f"| {name} | {r['clients']} | {r['tok_s']:.2f} | {r['tok_s'] / rows[0]['tok_s']:.2f}x | "
                  f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} s | {r['token_p50_s'] * 1e3:.0f} / "
                  f"{r['token_p95_s'] * 1e3:.0f} ms | {format_bytes(r['bytes_read_per_token'])} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
