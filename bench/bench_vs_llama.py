"""Decode (tg) and prefill (pp) tokens/s, edgemoe's C engine vs llama.cpp (llama-cpp-python), on one model of
realistic shape, side by side in one run, same thread count, repetitions interleaved.

    EDGEMOE_NATIVE_LIB=.../libedgemoe_core.so PYTHONPATH=. python bench/bench_vs_llama.py \
        [--model /tmp/olmoe8] [--workdir /tmp/edgemoe_vs_llama] [--threads 1,2] [--reps 5] [-p 512] [-n 128] \
        [--pairs q8_0,f16,mwq2,mwq3,mwq4] [--json out.json]

The model is a Hugging Face checkpoint directory (random weights are fine for speed: make one with
bench/make_random_model.py). It is exported once (cached in --workdir) to:
  edgemoe: f16.emoe (experts + dense f16), q8_0.emoe (every matrix Q8_0, requantized from f16.emoe),
           mwq5.emoe (MWQ experts, 2-bit base + 3 residual planes, --nesting msb: no calibration text needed,
           same bytes and kernels as the calibrated fit; Q8_0 dense), run at precision k = 2, 3, 4 planes;
  GGUF:    F16, Q8_0, Q4_0_Q8_0 (experts Q4_0, dense Q8_0) with edgemoe's GGUF writer, and Q2_K (llama.cpp's own
           mix, by llama_model_quantize from the F16 GGUF).
Pairs: q8_0 = edgemoe q8_0 vs GGUF Q8_0; f16 = f16 vs F16; mwqK = edgemoe MWQ at k planes vs Q4_0_Q8_0, and vs Q2_K.
tg: n single-token evaluations from an empty context; pp: one evaluation of p tokens (edgemoe prefill; llama.cpp
eval with n_batch = p, logits of the last token only). Random token ids (seed 0). Every repetition runs each engine
once per test, engines alternating, so load drifts on a shared machine hit both alike; medians are reported.
Roofline: bytes of weights touched per decoded token (dense matrices without the embedding table, plus top_k/E of
the expert bytes: each token reads its top-k experts), divided by the median time per token, as a fraction of the
numpy read bandwidth measured in the same run (a sum over 1 GiB, split over the threads).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgemoe
from edgemoe import _native as N
from edgemoe.bandwidth import memory_read_bandwidth
from edgemoe.container import ContainerWriter, open_container

GiB = 1 << 30


# ---- exports (cached) ----------------------------------------------------------------------------------------------

def _cli_export(src: Path, out: Path, *args: str) -> None:
    if out.exists():
        return
    cmd = [sys.executable, "-m", "edgemoe", "export", str(src), "-o", str(out), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _requantize_q8_0(f16: Path, out: Path) -> None:
    """Every f16 matrix of f16.emoe (dense and experts) stored as Q8_0: the container the exporter would write for
    8-bit experts if it had a Q8_0 expert type (it writes MWQ for < 16 bits)."""
    if out.exists():
        return
    print(f"requantizing {f16.name} -> {out.name} (Q8_0)", flush=True)
    c = open_container(f16)
    tmp = out.with_name(out.name + ".tmp")
    with ContainerWriter(tmp, c.spec, c.metadata) as w:
        for name, t in c.tensors.items():
            if t.dtype == "f16" and len(t.shape) == 2 and t.shape[-1] % 32 == 0:
                w.add_tensor(name, N.quantize_q8_0(c.array(name).astype(np.float32)), "q8_0", t.shape, kind=t.kind)
            else:
                w.add_tensor(name, c.raw(name), t.dtype, t.shape, kind=t.kind)
    c.close()
    os.replace(tmp, out)


def _gguf(src: Path, out: Path, gguf_type: str) -> None:
    if out.exists():
        return
    from edgemoe_export.gguf_export import export_gguf

    print(f"writing {out.name}", flush=True)
    export_gguf(src, out, gguf_type, show_progress=False, tokenizer="none")


def _gguf_q2_k(f16_gguf: Path, out: Path, threads: int) -> None:
    if out.exists():
        return
    import llama_cpp

    print(f"llama_model_quantize {f16_gguf.name} -> {out.name} (Q2_K)", flush=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K
    params.nthread = threads
    tmp = out.with_name(out.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(f16_gguf).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    os.replace(tmp, out)


# ---- bytes touched per decoded token -------------------------------------------------------------------------------

def emoe_bytes_per_token(path: Path, precision: int | None, top_k: int, n_experts: int) -> int:
    c = open_container(path)
    dense = expert = 0
    for name, t in c.tensors.items():
        if t.kind == "dense" and len(t.shape) == 2 and name != "token_embd.weight":
            dense += t.nbytes
        elif t.kind == "expert":
            expert += (sum(p["nbytes"] for p in t.planes[:precision]) if t.planes and precision else t.nbytes)
    c.close()
    return int(dense + expert * top_k / n_experts)


def gguf_bytes_per_token(path: Path, top_k: int, n_experts: int) -> int:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    dense = expert = 0
    for t in r.tensors:
        if t.name == "token_embd.weight" or len(t.shape) < 2:
            continue
        if "_exps." in t.name:
            expert += int(t.n_bytes)
        else:
            dense += int(t.n_bytes)
    return int(dense + expert * top_k / n_experts)


# ---- runners -------------------------------------------------------------------------------------------------------

class EdgemoeRunner:
    def __init__(self, path: Path, threads: int, precision: int | None, n_ctx: int):
        self.model = edgemoe.load(path, threads=threads, engine="c", max_ctx=n_ctx, precision=precision)
        self.eng = self.model._engine  # the C engine itself: prefill / decode without sampling on top
        self.isa = self.eng.isa

    def pp(self, ids: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.eng.prefill(ids)
        return time.perf_counter() - t0

    def tg(self, first: int, n: int) -> float:
        self.eng.reset()
        tok = first
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(self.eng.decode(tok)))
        return time.perf_counter() - t0

    def close(self) -> None:
        self.eng.close() if hasattr(self.eng, "close") else None


class LlamaRunner:
    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=n_batch, n_ubatch=n_batch, logits_all=False, verbose=False)

    def pp(self, ids: np.ndarray) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids.tolist())
        return time.perf_counter() - t0

    def tg(self, first: int, n: int) -> float:
        self.llm.reset()
        tok = first
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return time.perf_counter() - t0

    def close(self) -> None:
        self.llm.close()


def _ratios(d: dict | None) -> str:
    return "; ".join(f"{v:.2f} vs {k.removeprefix('llama.cpp ')}" for k, v in (d or {}).items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/olmoe8"), help="Hugging Face checkpoint directory")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgemoe_vs_llama"), help="exports are cached here")
    ap.add_argument("--f16-container", type=Path, default=None, help="reuse this f16 .emoe of --model")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-p", type=int, default=512, help="prompt tokens (pp)")
    ap.add_argument("-n", type=int, default=128, help="generated tokens (tg)")
    ap.add_argument("--pairs", default="q8_0,f16,mwq2,mwq3,mwq4")
    ap.add_argument("--no-q2k", action="store_true", help="skip the Q2_K GGUF")
    ap.add_argument("--llama-no-extra-bufts", action="store_true",
                    help="load the GGUFs with use_extra_bufts = false: no AMX and no repacked (interleaved) weight "
                         "layouts in llama.cpp. For machines whose cpuid advertises AMX that the hypervisor does not "
                         "enable (llama.cpp's AMX kernels die with SIGILL); it also costs llama.cpp its repacked "
                         "Q4_0 kernels, so say so next to the results")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.llama_no_extra_bufts:
        import llama_cpp.llama_cpp as llama_lib  # the module Llama() takes its default model parameters from

        default_params = llama_lib.llama_model_default_params

        def no_extra_bufts():
            p = default_params()
            p.use_extra_bufts = False
            return p

        llama_lib.llama_model_default_params = no_extra_bufts
    cfg = json.loads((args.model / "config.json").read_text())
    top_k, n_exp = int(cfg["num_experts_per_tok"]), int(cfg["num_experts"])
    args.workdir.mkdir(parents=True, exist_ok=True)
    wd = args.workdir
    pairs = args.pairs.split(",")
    threads_list = [int(t) for t in args.threads.split(",")]

    # exports
    f16 = args.f16_container or wd / "f16.emoe"
    if any(p in ("f16", "q8_0") for p in pairs):
        _cli_export(args.model, f16, "--bits", "16", "--dense-bits", "16")
    if "q8_0" in pairs:
        _requantize_q8_0(f16, wd / "q8_0.emoe")
        _gguf(args.model, wd / "q8_0.gguf", "Q8_0")
    if "f16" in pairs or (not args.no_q2k and any(p.startswith("mwq") for p in pairs)):
        _gguf(args.model, wd / "f16.gguf", "F16")
    if any(p.startswith("mwq") for p in pairs):
        _cli_export(args.model, wd / "mwq5.emoe", "--bits", "5", "--dense-bits", "8", "--nesting", "msb")
        _gguf(args.model, wd / "q4_0_q8_0.gguf", "Q4_0_Q8_0")
        if not args.no_q2k:
            _gguf_q2_k(wd / "f16.gguf", wd / "q2_k.gguf", max(threads_list))

    # groups: (label, [(edgemoe engine name, container, precision)], [(gguf name, file)]); the MWQ precisions share
    # one group so the llama.cpp files run once per repetition
    plan = []
    for p in pairs:
        if p == "q8_0":
            plan.append(("q8_0 vs Q8_0", [("edgemoe q8_0", wd / "q8_0.emoe", None)], [("Q8_0", wd / "q8_0.gguf")]))
        elif p == "f16":
            plan.append(("f16 vs F16", [("edgemoe f16", f16, None)], [("F16", wd / "f16.gguf")]))
        elif not p.startswith("mwq"):
            raise SystemExit(f"unknown pair {p!r}")
    ks = [int(p[3:]) for p in pairs if p.startswith("mwq")]
    if ks:
        gg = [("Q4_0 experts + Q8_0", wd / "q4_0_q8_0.gguf")] + ([] if args.no_q2k else [("Q2_K", wd / "q2_k.gguf")])
        plan.append(("MWQ experts + Q8_0 dense", [(f"edgemoe MWQ k={k} ({1 + k} bits)", wd / "mwq5.emoe", k)
                                                  for k in ks], gg))

    rng = np.random.default_rng(0)
    vocab = int(cfg["vocab_size"])
    prompt = rng.integers(1, vocab, args.p).astype(np.int32)
    first = int(prompt[0])
    n_ctx = args.p + args.n + 16
    rows = []
    load = os.getloadavg()
    for threads in threads_list:
        bw = memory_read_bandwidth(threads, 1 << 30, reps=5)["bytes_per_s"] / 1e9
        for label, ours, ggufs in plan:
            engines, bpt, isa = {}, {}, None
            for name, path, k in ours:
                engines[name] = EdgemoeRunner(path, threads, k, n_ctx)
                bpt[name] = emoe_bytes_per_token(path, k, top_k, n_exp)
                isa = engines[name].isa
            for gname, gpath in ggufs:
                engines[f"llama.cpp {gname}"] = LlamaRunner(gpath, threads, n_ctx, args.p)
                bpt[f"llama.cpp {gname}"] = gguf_bytes_per_token(gpath, top_k, n_exp)
            for e in engines.values():  # warm up: page faults, thread pools
                e.pp(prompt[:16])
                e.tg(first, 4)
            pp = {n: [] for n in engines}
            tg = {n: [] for n in engines}
            for _ in range(args.reps):
                for n, e in engines.items():
                    tg[n].append(e.tg(first, args.n))
                    pp[n].append(e.pp(prompt))
            for e in engines.values():
                e.close()
            for n in engines:
                tg_med, pp_med = statistics.median(tg[n]), statistics.median(pp[n])
                gbs = bpt[n] * args.n / tg_med / 1e9
                rows.append({
                    "pair": label, "engine": n, "threads": threads,
                    "isa": isa if n.startswith("edgemoe") else "llama.cpp native",
                    f"tg{args.n}_tok_s": round(args.n / tg_med, 2), f"pp{args.p}_tok_s": round(args.p / pp_med, 1),
                    f"tg{args.n}_samples_tok_s": [round(args.n / t, 2) for t in tg[n]],
                    f"pp{args.p}_samples_tok_s": [round(args.p / t, 1) for t in pp[n]],
                    "bytes_per_token": bpt[n], "decode_gbs": round(gbs, 2), "read_bw_gbs": round(bw, 2),
                    "roofline_fraction": round(gbs / bw, 3),
                })
            print(f"done: {label}, {threads} thread(s)", flush=True)

    # ratios: each edgemoe row over each llama.cpp row of the same group and thread count
    for r in rows:
        if not r["engine"].startswith("edgemoe"):
            continue
        for x in rows:
            if x["pair"] == r["pair"] and x["threads"] == r["threads"] and x["engine"].startswith("llama.cpp"):
                r.setdefault("tg_ratio_vs", {})[x["engine"]] = round(r[f"tg{args.n}_tok_s"] / x[f"tg{args.n}_tok_s"], 3)
                r.setdefault("pp_ratio_vs", {})[x["engine"]] = round(r[f"pp{args.p}_tok_s"] / x[f"pp{args.p}_tok_s"], 3)
    info = {"machine": platform.machine(), "model": str(args.model), "config": cfg, "threads": threads_list,
            "llama_use_extra_bufts": not args.llama_no_extra_bufts,
            "reps": args.reps, "p": args.p, "n": args.n, "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(),
            "rows": rows}
    print(f"\nedgemoe {N.version()} vs llama.cpp, {args.model} ({cfg['num_hidden_layers']} layers, hidden "
          f"{cfg['hidden_size']}, {n_exp} experts top-{top_k}), medians of {args.reps} interleaved repetitions, "
          f"load average {load[0]:.1f} -> {info['loadavg_at_end'][0]:.1f}\n")
    print(f"| group | engine | threads | tg{args.n} tok/s | pp{args.p} tok/s | tg ratio edgemoe/llama.cpp |"
          " pp ratio | MiB/token | decode GB/s | read BW GB/s | roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['engine']} | {r['threads']} | {r[f'tg{args.n}_tok_s']} | {r[f'pp{args.p}_tok_s']} |"
              f" {_ratios(r.get('tg_ratio_vs'))} | {_ratios(r.get('pp_ratio_vs'))} |"
              f" {r['bytes_per_token'] / 2**20:.0f} | {r['decode_gbs']} | {r['read_bw_gbs']} |"
              f" {100 * r['roofline_fraction']:.0f}% |")
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
