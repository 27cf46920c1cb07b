"""Kernel benchmark: GB/s of weights streamed by the C core's matvec (decode) kernels, next to the machine's measured
memory read bandwidth, plus the prefill matmul (a block of tokens) in GFLOP/s.

    EDGEMOE_NATIVE_LIB=/tmp/native_build/libedgemoe_core.so PYTHONPATH=. python bench/bench_kernels.py [--quick]
        [--json out.json] [--isa avx2,avx512vnni]

Matrices are larger than the last-level cache, so a matvec is a pure stream of its weights: its GB/s against the
numpy read bandwidth (sum over a 1 GiB array, best of 5; with 2 threads each sums half) says how close decode gets to
the memory roofline. Timings are the best of several runs (the machine is shared and noisy); the median is shown too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgemoe import _native as N
from edgemoe.bandwidth import memory_read_bandwidth

GiB = 1 << 30


def timed(fn, reps: int, min_time: float = 0.0) -> list[float]:
    fn()  # warm up (page faults, pool threads)
    out, t_start = [], time.perf_counter()
    while len(out) < reps or time.perf_counter() - t_start < min_time:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def memory_bandwidth(threads: int, nbytes: int, reps: int) -> dict:
    """numpy read bandwidth (edgemoe.bandwidth's probe), in this script's units."""
    m = memory_read_bandwidth(threads, nbytes, reps)
    return {"threads": threads, "best_gbs": m["bytes_per_s"] / 1e9, "median_gbs": m["median_bytes_per_s"] / 1e9}


# kernel name -> (storage type, emoe_matmul wtype)
KERNELS = {"f32": (N.F32, N.F32), "f16": (N.F16, N.F16), "q8_0": (N.Q8_0, N.Q8_0),
           "q8_0_f32act": (N.Q8_0, N.Q8_0 | N.MATMUL_F32_ACT)}


def make_weights(wtype: str, rows: int, cols: int, rng) -> np.ndarray:
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    if wtype == "f16":
        return w.astype(np.float16)
    if wtype.startswith("q8_0"):
        return N.quantize_q8_0(w)
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller matrices and fewer repetitions")
    ap.add_argument("--isa", default="auto", help="auto | scalar | avx2 | avx512vnni | neon | neon_dotprod, or a "
                    "comma-separated list (each kernel timed with each, one after the other)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    by_name = {N.isa_name(i): i for i in range(N.ISA_COUNT)}
    isas = [i for i in (N.isa_best() if n == "auto" else by_name[n] for n in args.isa.split(",")) if N.isa_supported(i)]
    isa_used = ",".join(N.isa_name(i) for i in isas)
    threads_list = [int(t) for t in args.threads.split(",")]
    reps = 5 if args.quick else 9
    rng = np.random.default_rng(0)
    # weights > the LLC (32 MiB here): 128 MiB f32 / f16, 136 MiB q8_0 (quick: 64 / 64 / 68 MiB)
    s = 2 if args.quick else 1
    shapes = {"f32": (8192 // s, 4096), "f16": (8192 // s, 8192), "q8_0": (16384 // s, 8192),
              "q8_0_f32act": (16384 // s, 8192)}

    mem = [memory_bandwidth(t, (GiB // 2) if args.quick else GiB, 5) for t in threads_list]
    rows_out = []
    for wtype, (rows, cols) in shapes.items():
        w = make_weights(wtype, rows, cols, rng)
        wbytes = w.nbytes
        x1 = rng.standard_normal((1, cols), dtype=np.float32)
        y1 = np.empty((1, rows), np.float32)
        n_pre = 64
        xp = rng.standard_normal((n_pre, cols), dtype=np.float32)
        pre_rows = 2048  # prefill on a slice of the rows keeps the run short
        storage, api = KERNELS[wtype]
        wp = w[: pre_rows * N.row_bytes(storage, cols)] if storage == N.Q8_0 else w[:pre_rows]
        yp = np.empty((n_pre, pre_rows), np.float32)
        for t, isa in ((t, isa) for t in threads_list for isa in isas):
            pool = N.Pool(t) if t > 1 else None
            ts = timed(partial(N.matmul, w, api, x1, rows, cols, isa=isa, pool=pool, out=y1), reps, 0.3)
            tp = timed(partial(N.matmul, wp, api, xp, pre_rows, cols, isa=isa, pool=pool, out=yp), 3)
            bw = next(m for m in mem if m["threads"] == t)["best_gbs"]
            best = wbytes / min(ts) / 1e9
            rows_out.append({
                "kernel": f"{wtype} matvec", "isa": N.isa_name(isa), "rows": rows, "cols": cols, "weight_mib": round(wbytes / 2**20, 1),
                "threads": t, "best_gbs": round(best, 2), "median_gbs": round(wbytes / statistics.median(ts) / 1e9, 2),
                "mem_read_gbs": round(bw, 2), "fraction_of_bw": round(best / bw, 3),
                "prefill64_gflops": round(2 * n_pre * pre_rows * cols / min(tp) / 1e9, 1),
            })
            if pool:
                pool.close()
        del w

    info = {"machine": platform.machine(), "isa": isa_used, "numpy_read_bandwidth": mem, "kernels": rows_out}
    print(f"edgemoe {N.version()} kernels, isa={isa_used}, {platform.machine()}\n")
    print("| threads | numpy read GB/s (best) | median |")
    print("|---|---|---|")
    for m in mem:
        print(f"| {m['threads']} | {m['best_gbs']:.1f} | {m['median_gbs']:.1f} |")
    print()
    print("| isa | kernel | shape | weights MiB | threads | GB/s (best) | GB/s (median) | read BW GB/s | % of BW |"
          " prefill 64 tok GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['isa']} | {r['kernel']} | {r['rows']}x{r['cols']} | {r['weight_mib']} | {r['threads']} | {r['best_gbs']:.1f} |"
              f" {r['median_gbs']:.1f} | {r['mem_read_gbs']:.1f} | {100 * r['fraction_of_bw']:.0f}% |"
              f" {r['prefill64_gflops']:.1f} |")
    print()
    print(json.dumps(info, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
