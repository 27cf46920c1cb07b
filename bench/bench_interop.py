"""edgemoe vs llama.cpp vs onnxruntime on the same trained model (export/assets/small-moe), bits matched.

One invocation does everything:
1. exports the model once to each format (skipped when the files exist in --workdir):
   - int8 tier: edgemoe container with Q8_0 dense and expert matrices + f32 routers/norms, byte-identical to the
     llama.cpp Q8_0 GGUF (checked block by block: tests/tiny_models_gguf.q8_0_container_like_gguf); ONNX with
     `--onnx-weights int8` (NNCF INT8_ASYM per output channel on the dense MatMuls, QMoE int8 per output channel
     on the experts: 8-bit too, but another grid than Q8_0's 32-value blocks; onnxruntime has no Q8_0).
   - fp32 tier: f32 container, F32 GGUF, fp32 ONNX.
2. logit agreement on held-out text (windows of --ctx tokens from heldout/pydocs.txt and heldout/shakespeare.txt,
   never trained on): each engine's logits over whole windows against each other and against transformers fp32 on
   the original weights: max relative error (max |a - b| / max |b|), top-1 agreement, mean KL, perplexity;
3. speed: pp (prompt of -p random ids, one batch) and tg (-n greedy steps through the KV cache) tokens/s with
   1 and 2 threads, the three engines interleaved A B C A B C for -r repetitions after a warm-up
   (edgemoe.bench.run_bench); medians and the edgemoe / other ratios.

    EDGEMOE_NATIVE_LIB=/tmp/build/libedgemoe_core.so PYTHONPATH=/tmp/devpath:. \
        python bench/bench_interop.py --workdir /tmp/interop [-p 128 -n 64 -r 7 --threads 1,2] [--json out.json]

llama.cpp runs with its defaults in the speed part (F16 KV cache; edgemoe's is f32; at these contexts the KV
cache is a small part of the work) and with an F32 KV cache in the agreement part (no extra rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SMALL_MOE = ROOT / "export" / "assets" / "small-moe"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models_gguf.q8_0_container_like_gguf

ENGINES = ("edgemoe", "llama.cpp", "onnxruntime")


def prepare(workdir: Path) -> dict[str, dict[str, Path]]:
    """tier -> engine -> file, exported from SMALL_MOE once."""
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf
    from edgemoe_export.onnx_export import export_onnx
    from tiny_models_gguf import q8_0_container_like_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    files = {
        "int8": {"edgemoe": workdir / "q8_0.emoe", "llama.cpp": workdir / "q8_0.gguf",
                 "onnxruntime": workdir / "onnx_int8" / "model.onnx"},
        "fp32": {"edgemoe": workdir / "f32.emoe", "llama.cpp": workdir / "f32.gguf",
                 "onnxruntime": workdir / "onnx_fp32" / "model.onnx"},
    }
    steps = [
        (files["int8"]["llama.cpp"], lambda: export_gguf(SMALL_MOE, files["int8"]["llama.cpp"], "Q8_0",
                                                         show_progress=False)),
        (files["int8"]["edgemoe"], lambda: q8_0_container_like_gguf(SMALL_MOE, files["int8"]["llama.cpp"],
                                                                    files["int8"]["edgemoe"])),
        (files["int8"]["onnxruntime"], lambda: export_onnx(SMALL_MOE, workdir / "onnx_int8", "int8",
                                                           show_progress=False)),
        (files["fp32"]["edgemoe"], lambda: export(SMALL_MOE, files["fp32"]["edgemoe"], bits=32, show_progress=False)),
        (files["fp32"]["llama.cpp"], lambda: export_gguf(SMALL_MOE, files["fp32"]["llama.cpp"], "F32",
                                                         show_progress=False)),
        (files["fp32"]["onnxruntime"], lambda: export_onnx(SMALL_MOE, workdir / "onnx_fp32", "fp32",
                                                           show_progress=False)),
    ]
    for path, make in steps:
        if not path.exists():
            t0 = time.perf_counter()
            make()
            print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return files


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir()) if path.suffix == ".onnx" else path.stat().st_size


# ---------------------------------------------------------------------------------------------------------------
# logit agreement


def heldout_windows(tokenizer, ctx: int, per_doc: int) -> list[list[int]]:
    out = []
    for doc in ("pydocs", "shakespeare"):
        ids = tokenizer.encode((SMALL_MOE / "heldout" / f"{doc}.txt").read_text(encoding="utf-8"))
        step = (len(ids) - ctx) // per_doc
        out += [ids[i * step: i * step + ctx] for i in range(per_doc)]
    return out


def all_logits(tier_files: dict[str, Path], windows: list[list[int]]) -> dict[str, list[np.ndarray]]:
    """engine -> [window logits [ctx, vocab]] (2 threads each; fp32 KV caches)."""
    from llama_cpp import Llama

    import edgemoe
    from edgemoe.bench_onnx import OnnxRunner

    ctx = max(len(w) for w in windows)
    out: dict[str, list[np.ndarray]] = {}
    with edgemoe.load(tier_files["edgemoe"], engine="c", threads=2, max_ctx=ctx + 8) as m:
        out["edgemoe"] = [m.logits(w) for w in windows]
    llm = Llama(model_path=str(tier_files["llama.cpp"]), n_ctx=ctx + 8, n_batch=ctx + 8, n_ubatch=ctx + 8,
                n_threads=2, n_threads_batch=2, logits_all=True, type_k=0, type_v=0, verbose=False)
    try:
        rows = []
        for w in windows:
            llm.reset()
            llm.eval(w)
            rows.append(np.array(llm.scores[: llm.n_tokens], dtype=np.float32))
        out["llama.cpp"] = rows
    finally:
        llm.close()
    runner = OnnxRunner(tier_files["onnxruntime"], n_threads=2)
    out["onnxruntime"] = [runner.logits(w) for w in windows]
    return out


def hf_reference(windows: list[list[int]]) -> list[np.ndarray]:
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(SMALL_MOE, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([w])).logits[0].float().numpy() for w in windows]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    """a against reference b, over all windows and positions."""
    A, B = np.concatenate(a), np.concatenate(b)
    la, lb = _log_softmax(A), _log_softmax(B)
    return {"max_rel_err": float(np.abs(A - B).max() / np.abs(B).max()),
            "top1_agree": float((A.argmax(-1) == B.argmax(-1)).mean()),
            "kl_mean": float((np.exp(lb) * (lb - la)).sum(-1).mean())}


def perplexity(logits: list[np.ndarray], windows: list[list[int]]) -> float:
    nll = [-_log_softmax(lg[:-1])[np.arange(len(w) - 1), w[1:]] for lg, w in zip(logits, windows)]
    return float(np.exp(np.concatenate(nll).mean()))


def agreement(files: dict, windows: list[list[int]]) -> dict:
    ref = hf_reference(windows)
    report = {"windows": len(windows), "tokens": sum(len(w) for w in windows),
              "hf_fp32_ppl": perplexity(ref, windows), "tiers": {}}
    for tier, tier_files in files.items():
        lg = all_logits(tier_files, windows)
        pairs = {f"{x} vs {y}": compare(lg[x], lg[y]) for x, y in
                 (("edgemoe", "llama.cpp"), ("edgemoe", "onnxruntime"), ("llama.cpp", "onnxruntime"))}
        pairs.update({f"{e} vs transformers fp32": compare(lg[e], ref) for e in ENGINES})
        report["tiers"][tier] = {"pairs": pairs, "ppl": {e: perplexity(lg[e], windows) for e in ENGINES}}
        print(f"agreement {tier}: done", file=sys.stderr)
    return report


# ---------------------------------------------------------------------------------------------------------------
# speed


def speed(files: dict, threads: list[int], n_prompt: int, n_gen: int, reps: int) -> list[dict]:
    import edgemoe
    from edgemoe.bench import EdgeMoERunner, LlamaCppRunner, run_bench
    from edgemoe.bench_onnx import OnnxRunner

    rows = []
    for tier, tier_files in files.items():
        for t in threads:
            with edgemoe.load(tier_files["edgemoe"], engine="c", threads=t, max_ctx=n_prompt + n_gen + 8) as m:
                runners = [EdgeMoERunner(m), LlamaCppRunner(tier_files["llama.cpp"], t, n_prompt + n_gen + 8),
                           OnnxRunner(tier_files["onnxruntime"], t, spec=m.spec)]
                try:
                    results = run_bench(runners, m.spec.vocab, n_prompt=n_prompt, n_gen=n_gen, reps=reps, threads=t)
                finally:
                    runners[1].llm.close()
            for r in results:
                rows.append({"tier": tier, "threads": t, "engine": r.engine, "test": r.test,
                             "median_ts": statistics.median(r.samples_ts), "samples_ts": r.samples_ts})
            print(f"speed {tier} threads={t}: done", file=sys.stderr)
    return rows


def markdown(files: dict, agree: dict, rows: list[dict], reps: int) -> str:
    out = ["| tier | engine | file | threads | pp t/s | tg t/s | edgemoe / engine (pp, tg) |",
           "|---|---|---|---:|---:|---:|---|"]
    med = {(r["tier"], r["threads"], r["engine"], r["test"][:2]): r["median_ts"] for r in rows}
    for tier in files:
        for t in sorted({r["threads"] for r in rows}):
            for e in ENGINES:
                pp, tg = med[(tier, t, e, "pp")], med[(tier, t, e, "tg")]
                ratio = "" if e == "edgemoe" else (f"{med[(tier, t, 'edgemoe', 'pp')] / pp:.2f}, "
                                                   f"{med[(tier, t, 'edgemoe', 'tg')] / tg:.2f}")
                size = file_bytes(files[tier][e]) / 1e6
                out.append(f"| {tier} | {e} | {files[tier][e].name} ({size:.1f} MB) | {t} | {pp:.0f} | {tg:.0f} | "
                           f"{ratio} |")
    out += ["", f"(medians of {reps} interleaved repetitions)", "",
            (f"Logit agreement on {agree['tokens']} held-out tokens ({agree['windows']} windows); transformers fp32 "
             f"perplexity {agree['hf_fp32_ppl']:.2f}"), "",
            "| tier | pair | max rel err | top-1 agree | mean KL (nats) |", "|---|---|---:|---:|---:|"]
    for tier, d in agree["tiers"].items():
        for pair, c in d["pairs"].items():
            out.append(f"| {tier} | {pair} | {c['max_rel_err']:.2e} | {c['top1_agree']:.2%} | {c['kl_mean']:.1e} |")
        out.append(f"| {tier} | perplexity | " + ", ".join(f"{e} {p:.2f}" for e, p in d["ppl"].items()) + " | | |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="exports are written (and reused) here")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens (pp)")
    ap.add_argument("-n", type=int, default=64, help="generated tokens (tg)")
    ap.add_argument("-r", type=int, default=7, help="interleaved repetitions (medians reported)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ctx", type=int, default=256, help="tokens per held-out window (agreement)")
    ap.add_argument("--windows", type=int, default=4, help="windows per held-out document (agreement)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    files = prepare(args.workdir)
    import edgemoe

    with edgemoe.load(files["fp32"]["edgemoe"], engine="numpy") as m:
        windows = heldout_windows(m.tokenizer, args.ctx, args.windows)
    agree = agreement(files, windows)
    rows = speed(files, [int(t) for t in args.threads.split(",")], args.p, args.n, args.r)
    print(markdown(files, agree, rows, args.r))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "files": {t: {e: str(p) for e, p in f.items()} for t, f in files.items()},
                                         "agreement": agree, "speed": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
