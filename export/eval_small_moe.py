#!/usr/bin/env python3
"""Evaluate the small OLMoE checkpoint made by ``train_small_moe.py``: held-out perplexity and routing statistics.

For each domain (pydocs, shakespeare, gcide) the held-out documents are tokenized exactly as in training
(``<|endoftext|>`` before every document), cut into non-overlapping windows of ``--seq-len`` tokens, and run through
``OlmoeForCausalLM`` (transformers, fp32 compute on the stored fp16 weights). Reported:

* perplexity of the model on positions 1..seq_len-1 of every window, per domain and overall (token-weighted);
* two unigram baselines on the same target tokens: token frequencies of the pooled training split and of the
  domain's own training split, both add-one smoothed (counts come from ``train_token_counts.json``);
* routing: for every layer, the fraction of top-k assignments that go to each expert on each domain, the entropy of
  that distribution (bits; max log2(n_experts)), the Jensen-Shannon divergence between domains (bits; max 1 for a
  pair), the generalized JSD over all domains (= mutual information between domain and expert choice under a uniform
  domain prior), the top expert per domain, and the temporal locality of routing (share of a token's top-k experts
  that were also chosen for the previous token).

The held-out texts of pydocs and shakespeare are read from ``<model>/heldout/``; the GCIDE held-out part (GPL, not
shipped) is rebuilt from the ``dict-gcide`` package with the same code and split as in training and checked against
the sha256 recorded in ``train_log.json``.

Usage::

    python export/eval_small_moe.py --model export/assets/small-moe --report docs/small_model_report.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

try:  # installed as edgemoe_export.eval_small_moe
    from . import train_small_moe as tsm  # type: ignore
except ImportError:  # run as a script: python export/eval_small_moe.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_small_moe as tsm  # type: ignore

DOMAINS = tsm.DOMAINS
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "assets" / "small-moe")


def log(msg: str) -> None:
    print(msg, flush=True)


def heldout_texts(model_dir: Path, train_log: dict, gcide_path: str | None) -> dict[str, str]:
    """Held-out text per domain; GCIDE is rebuilt from the Debian package (its text is not shipped)."""
    texts = {}
    targs = train_log["args"]
    for i, d in enumerate(DOMAINS):
        meta = train_log["heldout"][d]
        if meta.get("shipped"):
            text = (model_dir / meta["file"]).read_text(encoding="utf-8")
        elif d == "gcide":
            try:
                docs = tsm.load_gcide(gcide_path or targs["gcide"])
            except FileNotFoundError as e:
                log(f"skipping gcide: {e}")
                continue
            _, test = tsm.split_docs(docs, seed=targs["seed"] + 101 * (i + 1), frac=targs["heldout_frac"],
                                     cap_bytes=targs["heldout_bytes"])
            text = tsm.join_docs(test)
        else:
            continue
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if sha != meta["sha256"]:
            log(f"WARNING: {d} held-out text differs from the one recorded at training time "
                f"(sha256 {sha[:16]} vs {meta['sha256'][:16]}); figures are not comparable")
        texts[d] = text
    return texts


def jsd(ps: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Generalized Jensen-Shannon divergence (bits) of the rows of ``ps``."""
    ps = np.asarray(ps, dtype=np.float64)
    w = np.full(len(ps), 1.0 / len(ps)) if weights is None else np.asarray(weights, dtype=np.float64)
    m = (w[:, None] * ps).sum(0)
    return float(entropy_bits(m) - sum(wi * entropy_bits(p) for wi, p in zip(w, ps)))


def entropy_bits(p: np.ndarray) -> float:
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def evaluate(args) -> dict:
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from transformers import OlmoeForCausalLM

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    train_log = json.loads((model_dir / "train_log.json").read_text())
    seq_len = args.seq_len or train_log["args"]["seq_len"]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = OlmoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config._experts_implementation = "eager"
    model.eval()
    cfg = model.config
    n_layers, n_exp, top_k = cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
    V = cfg.vocab_size

    counts = json.loads((model_dir / "train_token_counts.json").read_text())
    dom_counts = {d: np.asarray(counts[d], dtype=np.float64) for d in counts}
    pooled = sum(dom_counts.values())
    log_p_pooled = np.log((pooled + 1.0) / (pooled.sum() + V))
    log_p_dom = {d: np.log((c + 1.0) / (c.sum() + V)) for d, c in dom_counts.items()}

    texts = heldout_texts(model_dir, train_log, args.gcide)
    res_ppl, routing = {}, {}
    tot = {"nll": 0.0, "uni": 0.0, "unid": 0.0, "n": 0}
    usage = np.zeros((n_layers, len(DOMAINS), n_exp), dtype=np.float64)
    locality = np.zeros((n_layers, len(DOMAINS)), dtype=np.float64)
    loc_n = np.zeros(len(DOMAINS), dtype=np.float64)
    t0 = time.time()
    for di, d in enumerate(DOMAINS):
        if d not in texts:
            continue
        ids = tsm.encode_heldout_text(tok, texts[d])
        win = tsm.eval_windows(ids, seq_len, args.max_windows)
        nll, n = 0.0, 0
        for i in range(0, len(win), args.batch):
            x = torch.from_numpy(win[i:i + args.batch].astype(np.int64))
            with torch.no_grad():
                out = model(input_ids=x, output_router_logits=True, use_cache=False)
            logits = out.logits.float()
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1), reduction="sum").item()
            n += x[:, 1:].numel()
            for li, rl in enumerate(out.router_logits):
                probs = torch.softmax(rl.float(), dim=-1)
                top = torch.topk(probs, top_k, dim=-1).indices  # same selection as OlmoeTopKRouter
                usage[li, di] += np.bincount(top.reshape(-1).numpy(), minlength=n_exp)
                sel = torch.zeros(probs.shape, dtype=torch.bool).scatter_(1, top, True).view(x.shape[0], x.shape[1], -1)
                locality[li, di] += (sel[:, 1:] & sel[:, :-1]).sum().item() / top_k
            loc_n[di] += x[:, 1:].numel()
        tgt = win[:, 1:].reshape(-1)
        uni = -log_p_pooled[tgt].sum()
        unid = -log_p_dom[d][tgt].sum()
        bpt = len(texts[d].encode("utf-8")) / max(1, len(ids))
        res_ppl[d] = {"windows": len(win), "tokens": int(n), "bytes_per_token": bpt,
                      "model_nll": nll / n, "model_ppl": math.exp(nll / n),
                      "model_bits_per_byte": nll / n / math.log(2) / bpt,
                      "unigram_ppl": math.exp(uni / n), "unigram_domain_ppl": math.exp(unid / n)}
        tot["nll"] += nll
        tot["uni"] += uni
        tot["unid"] += unid
        tot["n"] += n
        log(f"{d:12s}: {len(win)} windows, ppl {res_ppl[d]['model_ppl']:.2f} vs unigram "
            f"{res_ppl[d]['unigram_ppl']:.1f} (pooled) / {res_ppl[d]['unigram_domain_ppl']:.1f} (domain) "
            f"[{time.time() - t0:.0f} s]")
    if tot["n"]:
        res_ppl["overall"] = {"windows": sum(r["windows"] for r in res_ppl.values()), "tokens": tot["n"],
                              "model_nll": tot["nll"] / tot["n"], "model_ppl": math.exp(tot["nll"] / tot["n"]),
                              "unigram_ppl": math.exp(tot["uni"] / tot["n"]),
                              "unigram_domain_ppl": math.exp(tot["unid"] / tot["n"])}

    present = [i for i, d in enumerate(DOMAINS) if d in texts]
    doms = [DOMAINS[i] for i in present]
    frac = usage[:, present] / usage[:, present].sum(-1, keepdims=True)
    pooled_use = usage[:, present].sum(1)
    pooled_use = pooled_use / pooled_use.sum(-1, keepdims=True)
    routing = {
        "domains": doms,
        "usage": {d: frac[:, k].round(5).tolist() for k, d in enumerate(doms)},
        "usage_pooled": pooled_use.round(5).tolist(),
        "entropy_bits": {d: [entropy_bits(frac[li, k]) for li in range(n_layers)] for k, d in enumerate(doms)},
        "entropy_bits_pooled": [entropy_bits(pooled_use[li]) for li in range(n_layers)],
        "max_entropy_bits": math.log2(n_exp),
        "jsd_pairs": {f"{doms[a]}|{doms[b]}": [jsd(frac[li, [a, b]]) for li in range(n_layers)]
                      for a in range(len(doms)) for b in range(a + 1, len(doms))},
        "jsd_all": [jsd(frac[li]) for li in range(n_layers)],
        "top_expert": {d: [[int(np.argmax(frac[li, k])), float(frac[li, k].max())] for li in range(n_layers)]
                       for k, d in enumerate(doms)},
        "locality": {d: (locality[:, i] / max(loc_n[i], 1)).tolist() for i, d in zip(present, doms)},
        "locality_random_top2": top_k / n_exp,
    }
    pairs = list(routing["jsd_pairs"].values())
    routing["jsd_mean_per_layer"] = [float(np.mean([p[li] for p in pairs])) for li in range(n_layers)] if pairs else []

    results = {
        "command": "python export/eval_small_moe.py " + " ".join(sys.argv[1:]) if args.command is None
        else args.command,
        "model": str(model_dir),
        "seq_len": seq_len,
        "max_windows": args.max_windows,
        "perplexity": res_ppl,
        "routing": routing,
        "eval_seconds": round(time.time() - t0, 1),
    }
    return results


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def render_report(ev: dict, model_dir: Path) -> str:
    tl = json.loads((model_dir / "train_log.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    a = tl["args"]
    r = ev["routing"]
    doms = r["domains"]
    n_layers = cfg["num_hidden_layers"]
    n_exp = cfg["num_experts"]
    size = (model_dir / "model.safetensors").stat().st_size
    L = []
    L.append("# Small trained MoE model: held-out perplexity and routing\n")
    L.append("Checkpoint: `export/assets/small-moe/` (Hugging Face OLMoE layout, fp16 safetensors, "
             f"{size / 1e6:.1f} MB). Produced by `export/train_small_moe.py`, measured by "
             "`export/eval_small_moe.py`.\n")
    L.append("Commands:\n")
    L.append("```sh")
    L.append(tl["command"])
    L.append(ev["command"])
    L.append("```\n")
    L.append("## Model and training\n")
    L.append(f"- OLMoE: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} "
             f"heads (= KV heads, head dim {cfg['hidden_size'] // cfg['num_attention_heads']}), {n_exp} experts "
             f"per layer, top-{cfg['num_experts_per_tok']}, expert width {cfg['intermediate_size']}, vocabulary "
             f"{cfg['vocab_size']} (byte-level BPE), untied embeddings, `norm_topk_prob` false; "
             f"{tl['model']['parameters'] / 1e6:.2f} M parameters, "
             f"{tl['model']['active_parameters_per_token'] / 1e6:.2f} M active per token")
    L.append("- corpus: Python 3.11 docs sources (PSF-2.0), Shakespeare plays and poems (public domain), GCIDE "
             "definitions (GPL-3+), split by document; batches balanced across the three domains")
    L.append(f"- {tl['steps']} steps x {a['batch']} x {a['seq_len']} tokens = {tl['tokens_seen'] / 1e6:.2f} M tokens, "
             f"AdamW, peak lr {a['lr']}, warmup {a['warmup']}, cosine to {a['min_lr_ratio']}x, router aux loss "
             f"coefficient {a['aux_coef']}, seed {a['seed']}")
    L.append(f"- training wall time {tl['train_seconds'] / 60:.1f} min on 2 vCPUs ({tl['tokens_per_s']:.0f} tokens/s, "
             f"machine shared with other jobs); whole script {tl['total_seconds'] / 60:.1f} min")
    L.append(f"- final training LM loss (mean of the last 50 steps) {tl['final_train_lm_loss_last50']:.3f} nats, "
             f"load-balancing aux loss {tl['final_aux_loss_last50']:.3f} ({cfg['num_experts_per_tok']}.0 = balanced)")
    if a.get("balance") == "per-layer":
        L.append("- load balancing: Switch loss computed per layer and averaged. transformers' built-in `aux_loss` "
                 "pools expert usage over layers; a first run trained with it (654 steps, otherwise identical) "
                 "reached held-out ppl 75.2 overall but left 1-3 experts per layer below 1.2 % of assignments "
                 "(layer 3: three experts below 0.5 %)")
    if tl.get("stop_reason") == "time budget":
        L.append(f"- training was ended by the {a['time_budget_min']} min wall-time budget before the "
                 f"{a['steps']}-step "
                 "cap (the lr schedule follows wall time in that case, so it was fully decayed)")
    L.append("")
    L.append("## Held-out perplexity\n")
    L.append(f"Non-overlapping windows of {ev['seq_len']} tokens over each domain's held-out documents "
             "(`<|endoftext|>` before each document); positions 1..n-1 of every window are scored. "
             "Model: fp32 compute on the fp16 checkpoint. Unigram baselines score the same tokens with add-one-"
             "smoothed token frequencies of the training split: pooled over the three domains, and of the "
             "domain itself.\n")
    L.append("| domain | windows | tokens scored | bytes/token | model ppl | bits/byte | unigram ppl (pooled) "
             "| unigram ppl (same domain) |")
    L.append("|---|---|---|---|---|---|---|---|")
    for d in list(doms) + ["overall"]:
        p = ev["perplexity"].get(d)
        if not p:
            continue
        bpt = f"{p['bytes_per_token']:.2f}" if p.get("bytes_per_token") else ""
        bpb = f"{p['model_bits_per_byte']:.2f}" if p.get("model_bits_per_byte") else ""
        name = f"**{d}**" if d == "overall" else d
        L.append(f"| {name} | {p['windows']} | {p['tokens']:,} | {bpt} | **{p['model_ppl']:.2f}** | {bpb} | "
                 f"{p['unigram_ppl']:.1f} | {p['unigram_domain_ppl']:.1f} |")
    L.append("")
    L.append("## Routing on held-out text\n")
    L.append(f"Top-{cfg['num_experts_per_tok']} assignments of every held-out token (all window positions), per "
             "layer. Entropy of the expert-usage distribution in bits (max "
             f"log2({n_exp}) = {r['max_entropy_bits']:.0f}). JSD = Jensen-Shannon divergence (bits, base 2) between "
             "two "
             "domains' usage distributions (0 = identical, 1 = disjoint); 'JSD all' is the generalized JSD of the "
             "three domains = mutual information between domain and expert choice under a uniform domain prior "
             "(max log2(3) = 1.58 bits).\n")
    L.append("### Entropy of expert usage (bits) and domain dependence\n")
    pair_names = list(r["jsd_pairs"].keys())
    head = "| layer | " + " | ".join(f"H {d}" for d in doms) + " | H pooled | " + \
           " | ".join(f"JSD {p.replace('|', ' vs ')}" for p in pair_names) + " | JSD all |"
    L.append(head)
    L.append("|" + "---|" * (2 + len(doms) + len(pair_names) + 1))
    for li in range(n_layers):
        L.append(f"| {li} | " + " | ".join(f"{r['entropy_bits'][d][li]:.3f}" for d in doms) +
                 f" | {r['entropy_bits_pooled'][li]:.3f} | " +
                 " | ".join(f"{r['jsd_pairs'][p][li]:.3f}" for p in pair_names) + f" | {r['jsd_all'][li]:.3f} |")
    L.append("")
    L.append("### Top expert per domain (share of that domain's top-k assignments; uniform = "
             f"{1 / n_exp:.3f})\n")
    L.append("| layer | " + " | ".join(doms) + " |")
    L.append("|" + "---|" * (1 + len(doms)))
    for li in range(n_layers):
        L.append(f"| {li} | " + " | ".join(f"e{r['top_expert'][d][li][0]} ({r['top_expert'][d][li][1]:.3f})"
                                          for d in doms) + " |")
    L.append("")
    L.append("### Expert usage fractions\n")
    L.append("Fraction of each domain's top-k assignments that go to each expert (rows sum to 1).\n")
    L.append("| layer | domain | " + " | ".join(f"e{e}" for e in range(n_exp)) + " |")
    L.append("|" + "---|" * (2 + n_exp))
    for li in range(n_layers):
        for d in doms:
            u = r["usage"][d][li]
            mx = max(u)
            L.append(f"| {li} | {d} | " + " | ".join(f"**{x:.3f}**" if x == mx else f"{x:.3f}" for x in u) + " |")
        L.append(f"| {li} | pooled | " + " | ".join(f"{x:.3f}" for x in r["usage_pooled"][li]) + " |")
    L.append("")
    L.append("### Temporal locality\n")
    L.append("Share of a token's top-k experts that were also selected for the previous token (same window), per "
             f"layer. Independent uniform routing would give {r['locality_random_top2']:.3f}. Relevant to expert "
             "caching: high values mean consecutive tokens reuse resident experts.\n")
    L.append("| layer | " + " | ".join(doms) + " |")
    L.append("|" + "---|" * (1 + len(doms)))
    for li in range(n_layers):
        L.append(f"| {li} | " + " | ".join(f"{r['locality'][d][li]:.3f}" for d in doms) + " |")
    L.append("")
    L.append("## Reading\n")
    ppl = ev["perplexity"]
    if "overall" in ppl:
        o = ppl["overall"]
        L.append(f"- Overall held-out perplexity {o['model_ppl']:.1f} vs {o['unigram_ppl']:.0f} for the pooled unigram "
                 f"({o['unigram_ppl'] / o['model_ppl']:.1f}x lower) and {o['unigram_domain_ppl']:.0f} for the "
                 "per-domain unigram.")
    jm = r["jsd_mean_per_layer"]
    if jm:
        L.append("- Routing is domain-dependent: mean pairwise JSD per layer " +
                 ", ".join(f"{v:.3f}" for v in jm) + " bits; generalized JSD (domain-expert mutual information) " +
                 ", ".join(f"{v:.3f}" for v in r["jsd_all"]) + " bits.")
    pooled_use = np.asarray(r["usage_pooled"])
    min_share = pooled_use.min(axis=1)
    L.append("- Pooled usage entropy per layer " + ", ".join(f"{v:.2f}" for v in r["entropy_bits_pooled"]) +
             f" bits (max {r['max_entropy_bits']:.0f}); least-used expert per layer " +
             ", ".join(f"{v:.3f}" for v in min_share) + f" of assignments (uniform {1 / n_exp:.3f})" +
             (": every expert is in use." if min_share.min() >= 0.02 else
              ": some experts are nearly unused on held-out text."))
    # the single largest domain contrast
    best = None
    for li in range(n_layers):
        for e in range(n_exp):
            vals = {d: r["usage"][d][li][e] for d in doms}
            hi, lo = max(vals, key=vals.get), min(vals, key=vals.get)
            gap = vals[hi] - vals[lo]
            if best is None or gap > best[0]:
                best = (gap, li, e, hi, vals[hi], lo, vals[lo])
    if best:
        _, li, e, hi, vh, lo, vl = best
        L.append(f"- Largest single contrast: layer {li} expert e{e} takes {vh:.1%} of {hi}'s top-k assignments "
                 f"but {vl:.1%} of {lo}'s.")
    L.append(f"\nEvaluation took {ev['eval_seconds']:.0f} s (2 threads).\n")
    return "\n".join(L)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_small_moe.py",
        description="Held-out perplexity (vs unigram baselines) and per-domain routing statistics of the small "
                    "OLMoE checkpoint written by train_small_moe.py. Writes a markdown report, eval_results.json "
                    "in the checkpoint folder, and refreshes the checkpoint README.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder (Hugging Face layout)")
    p.add_argument("--report", default=None, help="markdown report to write (e.g. docs/small_model_report.md)")
    p.add_argument("--gcide", default=None, help="GCIDE dictd file for rebuilding the GCIDE held-out split "
                                                 "(default: the path recorded at training time)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (0 = training seq_len)")
    p.add_argument("--max-windows", type=int, default=None, help="cap windows per domain (quick checks)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-update-model-dir", action="store_true",
                   help="do not write eval_results.json / README.md into the checkpoint folder")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    tsm.set_runtime_env()
    args = build_parser().parse_args(argv)
    ev = evaluate(args)
    model_dir = Path(args.model)
    if not args.no_update_model_dir:
        (model_dir / "eval_results.json").write_text(json.dumps(ev, indent=1))
        tsm.write_readme(model_dir)
        log(f"wrote {model_dir / 'eval_results.json'} and refreshed {model_dir / 'README.md'}")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(render_report(ev, model_dir))
        log(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
