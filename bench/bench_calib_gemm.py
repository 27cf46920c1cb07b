"""Would calibration through the C engine be faster? The routed-expert products, NumPy/BLAS vs the C core's kernels.

The calibrated export's forward pass is dominated by the routed experts' products: per OLMoE-1B-7B layer, 16384
tokens x top-8 = ~2048 tokens per expert, through gate / up [1024, 2048] and down [2048, 1024]. This times one
expert's three products on one thread both ways, on the same f16 weights and f32 activations:

- NumPy (what `edgemoe.reference.moe` runs during calibration): x @ W.T with W converted f16 -> f32 (OpenBLAS sgemm);
- C core (`edgemoe._native.matmul`, the engine's prefill kernel for f16 weights, `emoe_matmul`), all tokens at once.

    EDGEMOE_NATIVE_LIB=... PYTHONPATH=. python bench/bench_calib_gemm.py [--tokens 2048] [--reps 5]

Prints JSON: GFLOP/s of each (best and median of the repetitions) and the ratio C / NumPy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from edgemoe import _native as N


def timed(fn, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    H, F, n = a.hidden, a.ffn, a.tokens
    gate, up = (rng.standard_normal((F, H), dtype=np.float32).astype(np.float16) for _ in range(2))
    down = rng.standard_normal((H, F), dtype=np.float32).astype(np.float16)
    x = rng.standard_normal((n, H), dtype=np.float32)
    act = rng.standard_normal((n, F), dtype=np.float32)
    flops = 3 * 2 * n * H * F

    def numpy_expert():
        x @ gate.T, x @ up.T, act @ down.T  # f16 operands: converted to f32, then sgemm

    def c_expert():
        N.matmul(gate, N.F16, x, F, H), N.matmul(up, N.F16, x, F, H), N.matmul(down, N.F16, act, H, F)

    with threadpool_limits(1, user_api="blas"):
        t_np = timed(numpy_expert, a.reps)
    t_c = timed(c_expert, a.reps)  # no pool: one thread
    g = {k: {"best_gflops": round(flops / min(t) / 1e9, 1), "median_gflops": round(flops / statistics.median(t) / 1e9, 1)}
         for k, t in (("numpy_blas_f32", t_np), ("c_f16_prefill_kernel", t_c))}
    g["c_over_numpy_best"] = round(min(t_np) / min(t_c), 2)
    g["shape"] = {"tokens": n, "hidden": H, "expert_ffn": F, "threads": 1}
    print(json.dumps(g))


if __name__ == "__main__":
    main()
