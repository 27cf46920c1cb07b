"""MWQ plane-kernel benchmark: GB/s of bit planes streamed by the C core's matvec (decode) at precision k, next to the
dense Q8_0 (int8) kernel and the machine's measured read bandwidth, all in the same run.

    EDGEMOE_NATIVE_LIB=/tmp/native_build/libedgemoe_core.so PYTHONPATH=. python bench/bench_mwq.py [--quick]
        [--ks 2,3,4] [--base-bits 2] [--group 128] [--threads 1,2] [--json out.json] [--isa avx2,avx512vnni]

Bytes counted for MWQ are the bytes actually read at precision k: planes 1..k, scales included (P1 = s1, m1 and the
codes; each residual plane = its scales and sign bits): b1 + 32/g + (k - 1) (1 + 16/g) bits per weight, for b1 = 2,
g = 128: 3.375 / 4.5 / 5.625 bits per weight at k = 2 / 3 / 4. Q8_0 reads 8.5 bits per weight.
Kernels: "mwq" is the default path (the table-lookup kernels of native/src/mwq_lut.h where the ISA has them, for
base_bits 2 and group % 32 == 0), "mwq-perplane" the per-plane dot-product kernels (matmul_mwq(lut=False)) on the same
ISA, timed in the same round robin; a last table gives each kernel's time at k over its time at the largest k and the
table-lookup speedup (median over rounds of the per-round ratio).
Matrices are larger than the last-level cache (MWQ: 16384 x 8192 = 54-90 MiB of planes at k = 2..4; Q8_0: 136
MiB), so a matvec streams its weights from DRAM. Kernels are timed round-robin (Q8_0, then each k, repeatedly) so
the machine's load drifts affect them alike, together with the numpy read-bandwidth probe (a sum over 1 GiB; with 2
threads each sums half); best and median of each are shown. "vs q8_0" is the plane kernel's GB/s divided by the
same ISA's Q8_0 kernel's GB/s (the goal: >= 0.8, i.e. within 80% of the dense int8 kernel's bandwidth efficiency), from the
best times and, more robust on a shared machine, as the median over rounds of the ratio within a round (likewise
"% of BW"); "ns/weight" compares the time per weight (what decode speed depends on).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgemoe import _native as N
from edgemoe.bandwidth import MemoryReader

GiB = 1 << 30


def make_planes(rows: int, cols: int, b1: int, g: int, K: int, rng) -> list[np.ndarray]:
    """K planes in one buffer, laid out like a container (each plane 64-byte aligned), random codes and signs and
    sane f16 scales (the kernels' speed does not depend on the values)."""
    sizes = [N.mwq_plane_bytes(p, b1, g, rows, cols) for p in range(1, K + 1)]
    offs, pos = [], 0
    for s in sizes:
        offs.append(pos)
        pos += (s + 63) // 64 * 64
    buf = np.empty(pos + 4096, np.uint8)
    start = (-buf.ctypes.data) % 4096
    ng = rows * (cols // g)
    planes = []
    for p, (o, s) in enumerate(zip(offs, sizes), start=1):
        v = buf[start + o : start + o + s]
        v[:] = rng.integers(0, 256, s, dtype=np.uint8)
        n_scales = 2 * ng if p == 1 else ng
        sc = v[: 2 * n_scales].view(np.float16)
        sc[:] = (0.01 + 0.02 * rng.random(n_scales)).astype(np.float16)
        if p == 1:
            sc[ng:] = -sc[:ng] * 1.5
        planes.append(v)
    return planes


CLOCK = time.perf_counter  # --cpu-time: time.thread_time


def timed_round_robin(fns: dict, rounds: int, min_time: float) -> dict[str, list[float]]:
    for f in fns.values():
        f()  # warm up (page faults, pool threads)
    out = {k: [] for k in fns}
    t_start = time.perf_counter()
    r = 0
    items = list(fns.items())
    while r < rounds or time.perf_counter() - t_start < min_time:
        # odd rounds run in reverse order: a kernel timed right after another that read the same planes finds them
        # in cache, so no kernel always comes after the same one
        for k, f in items if r % 2 == 0 else items[::-1]:
            t0 = CLOCK()
            f()
            out[k].append(CLOCK() - t0)
        r += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller matrices and fewer repetitions")
    ap.add_argument("--isa", default="auto", help="auto | scalar | avx2 | avx512vnni | neon | neon_dotprod, or a "
                    "comma-separated list timed in the same round robin (default: auto = the best)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ks", default="2,3,4", help="precisions (planes) to time")
    ap.add_argument("--base-bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--in-cache", action="store_true",
                    help="1024 x 4096 matrices (about 2.4-4.3 MiB, inside the last-level cache): the kernels' compute "
                         "ceilings per core, independent of DRAM and of other processes' memory traffic")
    ap.add_argument("--shape", default=None, metavar="ROWS,COLS",
                    help="MWQ matrix shape instead of the defaults (e.g. 32768,2048: 32 experts' gate rows at OLMoE's "
                         "width, streamed from memory); the Q8_0 matrix gets the same shape")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the calling thread's CPU time instead of the wall clock (1 thread only): on a "
                         "loaded machine the wall clock also counts the time spent waiting for a core")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.cpu_time:
        if args.threads != "1":
            raise SystemExit("bench_mwq: --cpu-time needs --threads 1 (it times the calling thread only)")
        global CLOCK
        CLOCK = time.thread_time
    by_name = {N.isa_name(i): i for i in range(N.ISA_COUNT)}
    isas = [N.isa_best() if n == "auto" else by_name[n] for n in args.isa.split(",")]
    isas = [i for i in isas if N.isa_supported(i)]
    isa_used = ",".join(N.isa_name(i) for i in isas)
    threads_list = [int(t) for t in args.threads.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    b1, g = args.base_bits, args.group
    rng = np.random.default_rng(0)
    s = 2 if args.quick else 1
    rows_q8, cols = 16384 // s, 8192
    rows_mwq = 16384 // s
    rounds, min_time = (5, 1.0) if args.quick else (9, 3.0)
    if args.in_cache:
        rows_q8 = rows_mwq = 1024
        cols = 4096
        rounds, min_time = 200, 2.0
    if args.shape:
        rows_q8, cols = (int(v) for v in args.shape.split(","))
        rows_mwq = rows_q8

    mem_bytes = (GiB // 2) if args.quick else GiB
    mem = {}
    wq8 = N.quantize_q8_0(rng.standard_normal((rows_q8, cols), dtype=np.float32))
    planes = make_planes(rows_mwq, cols, b1, g, max(ks), rng)
    x1 = rng.standard_normal((1, cols), dtype=np.float32)
    y_q8 = np.empty((1, rows_q8), np.float32)
    y_mwq = np.empty((1, rows_mwq), np.float32)
    n_pre, pre_rows = 64, min(2048, rows_q8)
    xp = rng.standard_normal((n_pre, cols), dtype=np.float32)
    yp = np.empty((n_pre, pre_rows), np.float32)
    pre_planes = make_planes(pre_rows, cols, b1, g, max(ks), rng)
    wq8_pre = wq8[: pre_rows * N.row_bytes(N.Q8_0, cols)]
    mwq_bytes = {k: sum(p.nbytes for p in planes[:k]) for k in ks}

    def variants(isa):
        """(kernel label, lut flag): "mwq" = the default path (the table-lookup kernels where the ISA has them for
        this b1 and g), plus "mwq-perplane" (lut=False: the per-plane dot-product kernels) where that differs."""
        lut_here = N.mwq_lut_available(isa) and b1 == 2 and g % 32 == 0
        return [("mwq", True)] + ([("mwq-perplane", False)] if lut_here else [])

    rows_out = []
    for t in threads_list:
        pool = N.Pool(t) if t > 1 else None
        read = MemoryReader(t, mem_bytes)  # the read-bandwidth probe, timed in the same rounds as the kernels
        fns = {"read": read}
        for isa in isas:
            fns[f"{N.isa_name(isa)} q8_0"] = (lambda isa=isa, pool=pool: N.matmul(wq8, N.Q8_0, x1, rows_q8, cols, isa=isa,
                                                                        pool=pool, out=y_q8))
            for k in ks:
                for kern, lut in variants(isa):
                    fns[f"{N.isa_name(isa)} {kern} k={k}"] = (
                        lambda k=k, isa=isa, pool=pool, lut=lut: N.matmul_mwq(
                            planes, k, b1, g, x1, rows_mwq, cols, isa=isa, pool=pool, out=y_mwq, lut=lut))
        times = timed_round_robin(fns, rounds, min_time)
        rd = times.pop("read")
        mem[t] = {"threads": t, "best_gbs": read.nbytes / min(rd) / 1e9,
                  "median_gbs": read.nbytes / statistics.median(rd) / 1e9}
        read.close()
        pre = {}
        for isa in isas:
            pre[f"{N.isa_name(isa)} q8_0"] = (lambda isa=isa, pool=pool: N.matmul(wq8_pre, N.Q8_0, xp, pre_rows, cols, isa=isa,
                                                                        pool=pool, out=yp))
            for k in ks:
                for kern, lut in variants(isa):
                    pre[f"{N.isa_name(isa)} {kern} k={k}"] = (
                        lambda k=k, isa=isa, pool=pool, lut=lut: N.matmul_mwq(
                            pre_planes, k, b1, g, xp, pre_rows, cols, isa=isa, pool=pool, out=yp, lut=lut))
        pre_times = timed_round_robin(pre, 3, 0.0)
        bw = mem[t]["best_gbs"]
        for name, ts in times.items():
            isa_name, kern = name.split(" ", 1)
            q8_times = times[f"{isa_name} q8_0"]
            q8_best = wq8.nbytes / min(q8_times) / 1e9
            nbytes = wq8.nbytes if kern == "q8_0" else mwq_bytes[int(name.rsplit("=", 1)[1])]
            rows = rows_q8 if kern == "q8_0" else rows_mwq
            best = nbytes / min(ts) / 1e9
            # GB/s relative to q8_0 and to the read bandwidth, round by round (the three ran within a second of each
            # other, under the same machine load): the median of those ratios
            per_round = [(nbytes / a) / (wq8.nbytes / b) for a, b in zip(ts, q8_times)]
            per_round_bw = [(nbytes / a) / (read.nbytes / b) for a, b in zip(ts, rd)]
            pp_name = name.replace(" mwq k=", " mwq-perplane k=")
            lut_speedup = (statistics.median(b / a for a, b in zip(ts, times[pp_name]))
                           if kern.startswith("mwq k=") and pp_name in times else None)
            rows_out.append({
                "kernel": kern, "isa": isa_name, "threads": t, "bits_per_weight": round(8 * nbytes / (rows * cols), 3),
                "mib": round(nbytes / 2**20, 1), "best_gbs": round(best, 2),
                "median_gbs": round(nbytes / statistics.median(ts) / 1e9, 2), "mem_read_gbs": round(bw, 2),
                "fraction_of_bw": round(best / bw, 3), "vs_q8_0": round(best / q8_best, 3),
                "fraction_of_bw_median_round": round(statistics.median(per_round_bw), 3),
                "vs_q8_0_median_round": round(statistics.median(per_round), 3),
                "ns_per_weight": round(min(ts) / (rows * cols) * 1e9, 4),
                "prefill64_gflops": round(2 * n_pre * pre_rows * cols / min(pre_times[name]) / 1e9, 1),
                "lut_speedup_round_median": None if lut_speedup is None else round(lut_speedup, 3),
            })
        if pool:
            pool.close()

    info = {"machine": platform.machine(), "isa": isa_used, "clock": "thread cpu time" if args.cpu_time else "wall",
            "base_bits": b1, "group": g, "shape_mwq": [rows_mwq, cols],
            "shape_q8_0": [rows_q8, cols], "numpy_read_bandwidth": list(mem.values()), "kernels": rows_out}
    print(f"edgemoe {N.version()} MWQ plane kernels, isa={isa_used}, {platform.machine()}, base {b1} bits, group {g}\n")
    print("| threads | numpy read GB/s (best) | median |")
    print("|---|---|---|")
    for m in mem.values():
        print(f"| {m['threads']} | {m['best_gbs']:.1f} | {m['median_gbs']:.1f} |")
    print()
    print("| isa | kernel | threads | bits/weight | MiB read | GB/s (best) | GB/s (median) | read BW GB/s (best) |"
          " % of BW (best) | vs q8_0 (best) | % of BW (round median) | vs q8_0 (round median) | ns/weight (best) |"
          " prefill 64 tok GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['isa']} | {r['kernel']} | {r['threads']} | {r['bits_per_weight']:.3f} | {r['mib']} | {r['best_gbs']:.1f} |"
              f" {r['median_gbs']:.1f} | {r['mem_read_gbs']:.1f} | {100 * r['fraction_of_bw']:.0f}% |"
              f" {r['vs_q8_0']:.2f} | {100 * r['fraction_of_bw_median_round']:.0f}% |"
              f" {r['vs_q8_0_median_round']:.2f} | {r['ns_per_weight']:.4f} | {r['prefill64_gflops']:.1f} |")
    # decode time vs precision: each kernel's best time at k over its best time at the largest k (goal for the table
    # lookups: k = 1 at most 0.6x of k = 4), and the table-lookup speedup over the per-plane kernels (median of the
    # per-round ratios: both ran within the same round)
    print()
    print(f"| isa | threads | kernel | k | time / time at k={max(ks)} | LUT speedup vs per-plane (round median) |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        if r["kernel"] == "q8_0":
            continue
        kern, k = r["kernel"].rsplit(" k=", 1)
        top = next(x for x in rows_out if x["isa"] == r["isa"] and x["threads"] == r["threads"]
                   and x["kernel"] == f"{kern} k={max(ks)}")
        r["time_vs_kmax"] = round(r["ns_per_weight"] / top["ns_per_weight"], 3)
        sp = r.get("lut_speedup_round_median")
        print(f"| {r['isa']} | {r['threads']} | {kern} | {k} | {r['time_vs_kmax']:.2f} |"
              f" {'' if sp is None else f'{sp:.2f}'} |")
    print()
    print(json.dumps(info, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
