"""MWQ study: perplexity, KL to the 16-bit model and top-1 agreement for nested planes vs independent quantizers.

Rows (all with the same dense format, Q8_0 by default, so only the experts differ):
- 16-bit experts (the reference distribution for KL and top-1 agreement);
- MWQ (nesting mwq), exported ONCE with --bits 8 and read at precision k = 1..7 (2..8 bits): the point of nesting;
- optionally MWQ exported at --bits 4 directly (what nesting to 8 costs the 4-bit prefix);
- independent per-group round-to-nearest (RTN) at 2, 3, 4, 8 bits, asymmetric min/max, same group size
  (fake-quantized in NumPy on the 16-bit container's experts: each width is its own copy);
- MSB slicing (nesting msb, MatQuant-style sliced 8-bit codes without multi-width training) at 2, 4, 8 bits.

Usage (NumPy engine; a few minutes on the small model):
    PYTHONPATH=... python bench/mwq_study.py --model export/assets/small-moe --tokens 4096 --out docs/mwq_study.md
"""

from __future__ import annotations

import argparse
import glob
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def windows(ids: list[int], ctx: int, n_tokens: int) -> list[list[int]]:
    ids = ids[: n_tokens + 1]
    return [ids[s : s + ctx + 1] for s in range(0, len(ids) - 1, ctx) if len(ids[s : s + ctx + 1]) >= 2]


def evaluate(model, wins, ref_lp=None) -> dict:
    """NLL over the windows; with ref_lp (the 16-bit model's log-probs per window), KL(ref || this) and top-1."""
    nll, n, kl, agree = 0.0, 0, 0.0, 0
    lps = []
    for i, w in enumerate(wins):
        lp = log_softmax(model.logits(w[:-1]))
        nll -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
        if ref_lp is None:
            lps.append(lp.astype(np.float32))
        else:
            r = ref_lp[i].astype(np.float64)
            kl += float((np.exp(r) * (r - lp)).sum())
            agree += int((r.argmax(-1) == lp.argmax(-1)).sum())
    out = {"ppl": float(np.exp(nll / n)), "tokens": n}
    if ref_lp is None:
        out["lps"] = lps
    else:
        out["kl"] = kl / n
        out["top1"] = agree / n
    return out


def make_calib_text(path: Path, per_domain_chars: int = 60_000, doc_chars: int = 4000) -> Path:
    """A calibration text from the small model's TRAINING split (never its held-out documents), for when the model
    directory ships no calib.txt: the corpus is rebuilt with the trainer's own deterministic loader and split
    (export/train_small_moe.py, default arguments), then seeded samples of each domain's training documents are
    interleaved document by document so the first tokens already cover all domains."""
    import random

    sys.path.insert(0, str(REPO))
    from export.train_small_moe import DOMAINS, build_corpus, build_parser

    corpus = build_corpus(build_parser().parse_args(["--out", str(path.parent)]))
    per = {}
    for i, d in enumerate(DOMAINS):
        docs = list(corpus[d]["train"])
        random.Random(7 + i).shuffle(docs)
        chunks, size = [], 0
        for _, t in docs:
            if size > per_domain_chars:
                break
            chunks.append(t.strip()[:doc_chars])
            size += len(chunks[-1])
        per[d] = chunks
    out = [per[d][j] for j in range(max(map(len, per.values()))) for d in DOMAINS if j < len(per[d])]
    text = "\n\n".join(out)
    for d in DOMAINS:  # by construction, but check: no held-out document's opening in the calibration text
        assert not any(t.strip()[:200] in text for _, t in corpus[d]["test"])
    path.write_text(text, encoding="utf-8")
    return path


def expert_bits_per_weight(container, k: int | None = None) -> float:
    """Bits per expert weight on disk, scales included (MWQ: the first k planes, padding excluded)."""
    bits, weights = 0, 0
    for t in container.tensors.values():
        if t.kind != "expert":
            continue
        weights += int(np.prod(t.shape))
        bits += 8 * (sum(p["nbytes"] for p in t.planes[:k]) if t.planes else t.nbytes)
    return bits / weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "export/assets/small-moe"), help="Hugging Face model directory")
    p.add_argument("--heldout", default=None, help="glob of held-out text files (default MODEL/heldout/*.txt)")
    p.add_argument("--calib", default=None, help="calibration text (default MODEL/calib.txt)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens to evaluate")
    p.add_argument("--ctx", type=int, default=256, help="window length")
    p.add_argument("--dense-bits", type=int, default=8, help="dense format for every row (8 = Q8_0)")
    p.add_argument("--group-size", type=int, default=None, help="default: the exporter's (128 when it divides)")
    p.add_argument("--no-direct4", action="store_true", help="skip the MWQ row exported at --bits 4 directly")
    p.add_argument("--workdir", default=None, help="where to keep the exported containers (default: temp dir)")
    p.add_argument("--out", default=None, help="also write the markdown report here (e.g. docs/mwq_study.md)")
    p.add_argument("--note", default="", help="a line added under the table (e.g. which model this is)")
    args = p.parse_args(argv)

    from edgemoe_export import export
    from edgemoe_export.mwq import rtn_bits_per_weight, rtn_fake_quant

    import edgemoe
    from edgemoe.container import open_container

    model_dir = Path(args.model)
    files = sorted(glob.glob(args.heldout or str(model_dir / "heldout" / "*.txt")))
    if not files:
        print(f"no held-out text found ({args.heldout or model_dir / 'heldout/*.txt'})", file=sys.stderr)
        return 1
    text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    calib = Path(args.calib) if args.calib else model_dir / "calib.txt"
    calib_note = f"`{calib.name}` shipped with the model"
    if not calib.exists():
        calib = make_calib_text(work / "calib_from_train_split.txt")
        calib_note = (f"`{calib.name}`: {calib.stat().st_size // 1000} KB sampled from the training split by "
                      f"`make_calib_text` in this script (the model ships no calib.txt)")
    elif args.calib:
        calib_note = f"`{calib.name}`"
    common = {"dense_bits": args.dense_bits, "show_progress": False}
    timings = {}

    def timed_export(name, **kw):
        t0 = time.perf_counter()
        out = export(model_dir, work / f"{name}.emoe", **{**common, **kw})
        timings[name] = time.perf_counter() - t0
        print(f"exported {name} in {timings[name]:.1f} s", file=sys.stderr)
        return out

    f16 = timed_export("experts16", bits=16)
    mwq8 = timed_export("mwq8", bits=8, group_size=args.group_size, calib=calib, calib_tokens=args.calib_tokens)
    mwq4 = None if args.no_direct4 else timed_export(
        "mwq4", bits=4, group_size=args.group_size, calib=calib, calib_tokens=args.calib_tokens)
    msb8 = timed_export("msb8", bits=8, group_size=args.group_size, nesting="msb")
    c8 = open_container(mwq8, verify=False)
    g, base = c8.metadata["group_size"], c8.metadata["base_bits"]
    weight_only = len(c8.metadata.get("mwq_weight_only_experts", []))
    n_experts = len(c8.metadata.get("expert_calib_tokens", {}))

    with edgemoe.load(f16, engine="numpy") as m:
        wins = windows(m.tokenizer.encode(text), args.ctx, args.tokens)
        t0 = time.perf_counter()
        ref = evaluate(m, wins)
        eval_s = time.perf_counter() - t0
    ref_lp = ref.pop("lps")
    rows = [("16-bit experts (f16)", 16, 16.0, {**ref, "kl": 0.0, "top1": 1.0})]
    print(f"reference: ppl {ref['ppl']:.3f} over {ref['tokens']} tokens ({eval_s:.1f} s per row)", file=sys.stderr)

    def add(label, bits, bpw, res):
        rows.append((label, bits, bpw, res))
        print(f"{label:40s} ppl {res['ppl']:.3f}  KL {res['kl']:.4f}  top1 {res['top1']:.3f}", file=sys.stderr)

    for k in range(1, c8.tensors[next(n for n, t in c8.tensors.items() if t.planes)].n_planes + 1):
        with edgemoe.load(mwq8, engine="numpy", precision=k, verify=False) as m:
            add(f"MWQ, exported at 8, read k={k}", base + k - 1, expert_bits_per_weight(c8, k),
                evaluate(m, wins, ref_lp))
    if mwq4 is not None:
        c4 = open_container(mwq4, verify=False)
        with edgemoe.load(mwq4, engine="numpy", verify=False) as m:
            add("MWQ, exported at 4", 4, expert_bits_per_weight(c4), evaluate(m, wins, ref_lp))
        c4.close()
    for bits in (2, 3, 4, 8):
        with edgemoe.load(f16, engine="numpy") as m:
            eng = m._engine
            for name, t in m.container.tensors.items():
                if t.kind == "expert":
                    eng._cache[name] = rtn_fake_quant(eng.weight(name), bits, g)
            add(f"RTN {bits}-bit (independent copy)", bits, rtn_bits_per_weight(bits, g), evaluate(m, wins, ref_lp))
    cm = open_container(msb8, verify=False)
    for k in (1, 3, 7):
        with edgemoe.load(msb8, engine="numpy", precision=k, verify=False) as m:
            add(f"MSB slices of int8, k={k}", base + k - 1, expert_bits_per_weight(cm, k),
                evaluate(m, wins, ref_lp))
    cm.close()

    cmd = "python bench/mwq_study.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    ppl16 = ref["ppl"]
    dense = "Q8_0" if args.dense_bits == 8 else f"{args.dense_bits}-bit"
    header = (
        f"Model `{model_dir.name}`: {c8.spec.n_layers} layers, {c8.spec.n_experts} experts (top-{c8.spec.top_k}), "
        f"hidden {c8.spec.hidden}, expert ffn {c8.spec.expert_ffn}. Held-out text: {len(files)} file(s), "
        f"{ref['tokens']} tokens in windows of {args.ctx}. Dense weights {dense} in every row. Group size {g}, "
        f"MWQ base plane {base} bits, calibration {c8.metadata.get('calib_tokens')} tokens of {calib_note} "
        f"({weight_only} of {n_experts} experts fell back to the weight-only fit). NumPy engine."
    )
    lines = [
        header,
        "",
        ("| experts | bits | bits/weight on disk (with scales) | bytes/weight | perplexity | vs 16-bit | KL to 16-bit "
         "| top-1 agreement |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, bits, bpw, r in rows:
        lines.append(f"| {label} | {bits} | {bpw:.3f} | {bpw / 8:.4f} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / ppl16 - 1):+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.1f}% |")
    lines += ["", "Export times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ".", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["Command:", "", "```", f"PYTHONPATH=... {cmd}", "```"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text("# MWQ study: nested bit planes vs independent quantizers\n\n" + report + "\n")
    c8.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
