"""Forward-pass benchmark of the C engine on a random model of realistic shape (speed does not depend on the values):
prefill tokens/s (pp), decode tokens/s (tg), and decode's effective weight bandwidth (bytes of dense weights + the
routed experts actually touched per token, divided by the time per token) next to the numpy read bandwidth.

    EDGEMOE_NATIVE_LIB=/tmp/native_build/libedgemoe_core.so PYTHONPATH=. python bench/bench_decode.py \
        [--preset small|olmoe-half] [--dtype q8_0|f16|f32] [--threads 1,2] [-p 128] [-n 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemoe import _native as N
from edgemoe.arch import ArchSpec, dense_tensor_names, expert_tensor_name
from edgemoe.bandwidth import memory_read_bandwidth
from edgemoe.engine_c import CEngine

PRESETS = {
    # ~0.5 GB at q8_0: quick
    "small": {"n_layers": 8, "hidden": 1024, "vocab": 32000, "n_heads": 16, "n_kv_heads": 8, "head_dim": 64,
              "n_experts": 32, "top_k": 4, "expert_ffn": 512},
    # OLMoE-1B-7B with half the layers (8 of 16): ~3.7 GB at q8_0
    "olmoe-half": {"n_layers": 8, "hidden": 2048, "vocab": 50304, "n_heads": 16, "n_kv_heads": 16, "head_dim": 128,
                   "n_experts": 64, "top_k": 8, "expert_ffn": 1024},
}


def shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    H, nh, nkv, hd = spec.hidden, spec.n_heads, spec.n_kv_heads, spec.head_dim
    out = {"token_embd.weight": (spec.vocab, H), "output_norm.weight": (H,), "output.weight": (spec.vocab, H)}
    for layer in range(spec.n_layers):
        role = {"attn_norm": (H,), "ffn_norm": (H,), "wq": (nh * hd, H), "wk": (nkv * hd, H), "wv": (nkv * hd, H),
                "wo": (H, nh * hd), "q_norm": (nh * hd,), "k_norm": (nkv * hd,), "router": (spec.n_experts, H)}
        for r, name in dense_tensor_names(spec, layer).items():
            out[name] = role[r]
        for e in range(spec.n_experts):
            for m, s in (("gate", (spec.expert_ffn, H)), ("up", (spec.expert_ffn, H)), ("down", (H, spec.expert_ffn))):
                out[expert_tensor_name(layer, e, m)] = s
    return out


def build(spec: ArchSpec, dtype: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    tensors, dtypes = {}, {}
    for name, shp in shapes(spec).items():
        a = rng.standard_normal(shp, dtype=np.float32)
        if len(shp) == 1:
            tensors[name], dtypes[name] = a * 0.1 + 1.0, "f32"
            continue
        a *= 1.0 / np.sqrt(shp[1])
        if dtype == "q8_0":
            tensors[name], dtypes[name] = N.quantize_q8_0(a), "q8_0"
        elif dtype == "f16":
            tensors[name], dtypes[name] = a.astype(np.float16), "f16"
        else:
            tensors[name], dtypes[name] = a, "f32"
    return tensors, dtypes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="q8_0", choices=["q8_0", "f16", "f32"])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("-n", type=int, default=32, help="generated tokens (decode)")
    ap.add_argument("--kv-f16", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    spec = ArchSpec("olmoe", **PRESETS[args.preset], qk_norm="full")
    t0 = time.perf_counter()
    tensors, dtypes = build(spec, args.dtype)
    build_s = time.perf_counter() - t0
    nbytes = {n: a.nbytes for n, a in tensors.items()}
    expert_bytes = sum(v for n, v in nbytes.items() if ".expert." in n)
    dense_bytes = sum(nbytes.values()) - expert_bytes - nbytes["token_embd.weight"]  # embedding: one row per token
    per_token = dense_bytes + expert_bytes * spec.top_k / spec.n_experts
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, spec.vocab, args.p)
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        with CEngine(spec, tensors, dtypes, threads=threads, max_ctx=args.p + args.n + 8, kv_f16=args.kv_f16) as eng:
            eng.prefill(prompt[:8])  # warm up: page faults, pool threads
            pp = []
            for _ in range(2):
                t0 = time.perf_counter()
                logits = eng.prefill(prompt)
                pp.append(time.perf_counter() - t0)
            tg = []
            tok = int(np.argmax(logits))
            for _ in range(args.n):
                t0 = time.perf_counter()
                tok = int(np.argmax(eng.decode(tok)))
                tg.append(time.perf_counter() - t0)
            isa = eng.isa
        bw = memory_read_bandwidth(threads, 1 << 30, reps=5)["bytes_per_s"] / 1e9
        med = statistics.median(tg)
        results.append({
            "threads": threads, "isa": isa, f"pp{args.p}_tok_s": round(args.p / min(pp), 1),
            f"tg{args.n}_tok_s_median": round(1 / med, 2), f"tg{args.n}_tok_s_best": round(1 / min(tg), 2),
            "decode_weight_gbs_median": round(per_token / med / 1e9, 2), "numpy_read_gbs": round(bw, 1),
        })
    info = {"preset": args.preset, "dtype": args.dtype, "kv_f16": args.kv_f16, "spec": spec.to_json(),
            "model_bytes": sum(nbytes.values()), "bytes_per_decode_token": int(per_token),
            "build_s": round(build_s, 1), "results": results}
    print(f"{args.preset} {args.dtype}: {sum(nbytes.values()) / 2**30:.2f} GiB, "
          f"{per_token / 2**20:.0f} MiB touched per decode token (dense + top-{spec.top_k} of {spec.n_experts})\n")
    print(f"| threads | isa | pp{args.p} tok/s | tg{args.n} tok/s (median) | decode GB/s | numpy read GB/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['threads']} | {r['isa']} | {r[f'pp{args.p}_tok_s']} | {r[f'tg{args.n}_tok_s_median']} |"
              f" {r['decode_weight_gbs_median']} | {r['numpy_read_gbs']} |")
    print()
    print(json.dumps(info, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
