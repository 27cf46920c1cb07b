"""Per-layer cost of a calibrated MWQ export: calibrate one layer, then fit N of its experts' planes.

A full export at OLMoE-1B-7B's size takes an hour or more on the shared 2-core machine; this measures its two
dominant per-layer costs on the real shapes, so versions can be compared in minutes (CPU seconds, printed as JSON):

    python bench/bench_export_layer.py CHECKPOINT --calib TEXT [--experts 4] [--bits 4] [--tokens 16384]

It uses only the long-standing API (`calibrate.calibrate`, `mwq.quantize_matrix`), so the same script times older
checkouts (PYTHONPATH=OLD_CHECKOUT).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from edgemoe_export.calibrate import calibrate, load_calibration_ids
from edgemoe_export.mwq import quantize_matrix
from edgemoe_export.sources import open_source


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("--calib", required=True)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args(argv)
    ck = open_source(a.src)
    spec = ck.spec
    seqs = load_calibration_ids(ck.tokenizer_json, a.calib, a.tokens, 256, spec.vocab)
    c0, t0 = cpu(), time.perf_counter()
    cal = next(iter(calibrate(ck, seqs, group_size=128, show_progress=False)))
    c1, t1 = cpu(), time.perf_counter()
    for e in range(a.experts):
        for m in ("gate", "up", "down"):
            name = f"blk.0.expert.{e}.ffn_{m}.weight"
            gram = (cal.gram_mid if m == "down" else cal.gram_in).get(e)
            quantize_matrix(cal.experts[name], gram, 2, a.bits, 128, "mwq")
    c2, t2 = cpu(), time.perf_counter()
    print(json.dumps({
        "calib_tokens": int(sum(len(s) for s in seqs)), "experts_per_layer": spec.n_experts,
        "calibrate_layer_cpu_s": round(c1 - c0, 1), "calibrate_layer_wall_s": round(t1 - t0, 1),
        "quantize_expert_cpu_s": round((c2 - c1) / a.experts, 2), "quantize_expert_wall_s": round((t2 - t1) / a.experts, 2),
        "layer_cpu_s_estimate": round(c1 - c0 + spec.n_experts * (c2 - c1) / a.experts, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))


if __name__ == "__main__":
    main()
