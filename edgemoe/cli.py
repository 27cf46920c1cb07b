"""The `edgemoe` command: export, info, run, chat, ppl, bench, analyze, fit, demo."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import time
from pathlib import Path

from .arch import kv_values_per_token
from .cli_options import (
    check_model_path,
    context_opts,
    default_threads,
    generate_kwargs,
    load_args,
    runtime_opts,
    sampling_kwargs,
    sampling_opts,
)
from .cli_progress import Progress
from .cli_tools import add_tool_parsers
from .errors import ContextError, EdgeMoEError, Terminated
from .units import format_bytes, format_size_like


def _need_exporter():
    try:
        import edgemoe_export
    except ImportError as e:
        raise EdgeMoEError(
            f"the exporter is not installed ({e.name} missing): pip install 'edgemoe[export]'"
        ) from None
    return edgemoe_export


def cmd_export(args) -> int:
    exporter = _need_exporter()
    from edgemoe_export.interrupt import signals_raise

    with signals_raise():  # SIGTERM / SIGHUP: the writers remove their temporary files, as on Ctrl-C
        return _export(exporter, args)


# merge methods that drop experts: llama.cpp's router cannot exclude one, so no GGUF computes their result
PRUNING_MERGE_METHODS = ("reap", "prune")


def _export(exporter, args) -> int:
    merging = args.merge_ratio is not None or args.experts_per_layer is not None
    if args.gguf and merging:  # refused before any work, not after the container is written
        from edgemoe_export.merge import DEFAULT_METHOD

        method = args.merge_method or DEFAULT_METHOD
        if method in PRUNING_MERGE_METHODS:
            raise EdgeMoEError(f"--gguf with --merge-method {method}{' (the default)' if not args.merge_method else ''}: "
                               "it prunes experts, which llama.cpp's router cannot exclude, so no GGUF computes the "
                               "result; pass --merge-method mcsmoe (or average) to write the GGUF too, or drop --gguf")
    t0 = time.perf_counter()
    out = exporter.export(args.src, args.output, bits=args.bits, dense_bits=args.dense_bits,
                          show_progress=not args.quiet, base_bits=args.base_bits, group_size=args.group_size,
                          nesting=args.nesting, calib=args.calib, calib_tokens=args.calib_tokens,
                          merge_ratio=args.merge_ratio, experts_per_layer=args.experts_per_layer,
                          merge_method=args.merge_method, low_rank=args.low_rank, predictor=args.predictor)
    print(f"wrote {out} ({format_bytes(out.stat().st_size)}) in {time.perf_counter() - t0:.1f} s")
    from .container import open_container

    c = open_container(out, verify=False)
    summary = c.metadata.get("export_summary")
    c.close()
    if summary:
        print(format_export_summary(summary, out.stat().st_size))
    if args.gguf:  # from the container, so merged / quantized experts reach llama.cpp as edgemoe computes them
        from edgemoe_export.gguf_export import export_gguf_from_container

        t1 = time.perf_counter()
        g = export_gguf_from_container(out, args.gguf, args.gguf_type, show_progress=not args.quiet)
        print(f"wrote {g} ({format_bytes(Path(g).stat().st_size)}, {args.gguf_type}) in {time.perf_counter() - t1:.1f} s")
    if args.onnx:
        from edgemoe_export.onnx_export import export_onnx

        t1 = time.perf_counter()
        o = export_onnx(out, args.onnx, weights=args.onnx_weights, show_progress=not args.quiet)
        print(f"wrote {o} ({args.onnx_weights}) in {time.perf_counter() - t1:.1f} s")
    return 0


EXPORT_PARTS = ("embeddings", "attention", "norms", "router", "predictor", "shared expert", "dense FFN", "experts",
                "lm_head", "other")
EXPORT_STAGES = ("read", "calibrate", "merge", "quantize", "predictor", "write")


def format_export_summary(s: dict, file_bytes: int) -> str:
    """The closing table of `edgemoe export`: size per part before and after, bits per weight, merge map, stages."""
    rows = [("part", "tensors", "source", "stored", "bits/weight", "storage")]
    found = s.get("parts", {})
    for part in sorted(found, key=lambda k: EXPORT_PARTS.index(k) if k in EXPORT_PARTS else len(EXPORT_PARTS)):
        r = found[part]
        src = (f"{format_bytes(r['source_bytes'])} {'/'.join(r['source_dtypes'])}" if r["source_bytes"] else "-")
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") is not None else "-"
        rows.append((part, str(r["tensors"]), src, format_bytes(r["stored_bytes"]), bpw,
                     "/".join(r["stored_dtypes"])))
    weights = sum(r["weights"] for r in s.get("parts", {}).values())
    total_src = s.get("source_bytes", 0)
    rows.append(("total", str(sum(r["tensors"] for r in s.get("parts", {}).values())),
                 format_bytes(total_src) if total_src else "-", format_bytes(s.get("stored_bytes", 0)),
                 f"{8 * s.get('stored_bytes', 0) / weights:.3f}" if weights else "-",
                 f"file {format_bytes(file_bytes)}"
                 + (f", {total_src / file_bytes:.1f}x smaller" if total_src and file_bytes else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    merge = s.get("merge_map")
    if merge:
        lines.append("merge map (routed experts -> stored experts; groups of routed experts sharing one):")
        for layer, m in enumerate(merge):
            if m is None:
                continue
            groups = " ".join("{" + ",".join(map(str, g)) + "}" for g in m["groups"])
            pruned = f", pruned {m['pruned']}" if m["pruned"] else ""
            lines.append(f"  layer {layer}: {m['experts']} -> {m['stored']}: {groups}{pruned}")
    cal = s.get("calibration")
    if cal:
        lines.append(f"calibration: {cal['text']}, {cal['tokens']} tokens ({cal['note']})" if cal["text"] else
                     f"calibration: none ({cal['note']})")
    stages = s.get("stages_s", {})
    if stages:
        parts = ", ".join(f"{k} {stages[k]:.1f} s" for k in EXPORT_STAGES if k in stages)
        lines.append(f"time per stage: {parts} (total {s.get('total_s', sum(stages.values())):.1f} s; stages "
                     f"interleave layer by layer, each counted once)")
    return "\n".join(lines)


def cmd_info(args) -> int:
    from .container import open_container

    c = open_container(args.model, verify=not args.no_verify)
    s = c.spec
    parts: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for t in c.tensors.values():
        parts[t.kind] = parts.get(t.kind, 0) + t.nbytes
        dtypes[f"{t.kind}:{t.dtype}"] = dtypes.get(f"{t.kind}:{t.dtype}", 0) + 1
    info = {"file": str(c.path), "version": c.version, "arch": s.to_json(), "metadata": c.metadata,
            "bytes": {**parts, "file": c.path.stat().st_size}, "tensors": dtypes}
    planes = _plane_summary(c)
    if planes:
        info["mwq_planes"] = planes
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{c.path}  ({format_bytes(c.path.stat().st_size)})")
    print(f"  family {s.family}: {s.n_layers} layers, hidden {s.hidden}, vocab {s.vocab}, "
          f"heads {s.n_heads}/{s.n_kv_heads} x {s.head_dim}")
    kv = kv_values_per_token(s) * 4  # f32 cache (an f16 cache halves it)
    print(f"  KV cache {format_bytes(kv)} per token (f32)"
          + (f": MLA latent {s.kv_lora_rank} + RoPE key {s.rope_dim} per layer" if s.kv_lora_rank else ""))
    print(f"  experts {s.n_experts} x ffn {s.expert_ffn}, top-{s.top_k} ({s.router_fn}"
          f"{', renormalized' if s.norm_topk else ''}; router on {s.router_input}), {s.activation}"
          + (f", shared expert ffn {s.shared_ffn}" if s.shared_ffn else ""))
    for kind, n in sorted(parts.items()):
        print(f"  {kind:7s} {format_bytes(n)}")
    print("  tensors " + ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())))
    if planes:
        m = c.metadata
        print(f"  MWQ experts: {len(planes)} planes (base {m.get('base_bits')} bits + {len(planes) - 1} residual), "
              f"group {m.get('group_size')}, nesting {m.get('nesting')}; precision k reads planes 1..k")
        for p in planes:
            print(f"    plane {p['plane']} ({p['bits']} bit{'s' if p['bits'] > 1 else ''}): "
                  f"{format_bytes(p['bytes'])}, {p['bits_per_weight']:.3f} bits/weight with scales; "
                  f"k={p['plane']}: {p['bits'] if p['plane'] == 1 else planes[0]['bits'] + p['plane'] - 1}-bit "
                  f"experts, {p['cumulative_bits_per_weight']:.3f} bits/weight, {format_bytes(p['cumulative_bytes'])}")
    meta = {k: v for k, v in c.metadata.items() if k not in BULKY_METADATA}
    print("  metadata " + json.dumps(meta))
    if "chat_template" in c.metadata:
        print(f"  chat template: {len(c.metadata['chat_template'])} characters (see --json)")
    if c.metadata.get("export_summary"):
        print("\nexport summary:")
        print(format_export_summary(c.metadata["export_summary"], c.path.stat().st_size))
    c.close()
    return 0


# Metadata shown as its own section (or only with --json) rather than inline: long per-expert or per-stage records.
BULKY_METADATA = ("export_summary", "expert_calib_tokens", "chat_template", "chat_template_tokens")


def _plane_summary(c) -> list[dict]:
    """Per plane index over all MWQ tensors: bytes, bits per weight (scales included, padding excluded)."""
    rows: dict[int, dict] = {}
    weights = 0
    for t in c.tensors.values():
        if t.dtype != "mwq":
            continue
        weights += t.shape[0] * t.shape[1]
        for i, p in enumerate(t.planes, start=1):
            r = rows.setdefault(i, {"plane": i, "bits": p["bits"], "bytes": 0})
            r["bytes"] += p["nbytes"]
    out, total = [], 0
    for i in sorted(rows):
        r = rows[i]
        total += r["bytes"]
        r["bits_per_weight"] = 8 * r["bytes"] / weights
        r["cumulative_bytes"] = total
        r["cumulative_bits_per_weight"] = 8 * total / weights
        out.append(r)
    return out


def cmd_run(args) -> int:
    from .model import load

    with load(args.model, **load_args(args)) as m:
        pieces = []
        try:
            stream = m.generate(args.prompt, max_new_tokens=args.n, stream=True, **sampling_kwargs(args, m.generate),
                                **generate_kwargs(args))
        except ContextError as e:
            raise EdgeMoEError(context_advice(e, "the prompt")) from None
        for piece in stream:
            pieces.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
        info = stream.info
        if args.json:
            print(json.dumps({"prompt": args.prompt, "text": "".join(pieces), "finish_reason": info.finish_reason,
                              "prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
                              "prompt_tokens_truncated": info.prompt_tokens_truncated,
                              "context_shifts": info.context_shifts, "stats": m.stats}))
        else:
            end_line(pieces)
            if info.prompt_tokens_truncated:
                print(f"[prompt truncated ({args.truncate}): {info.prompt_tokens_truncated} of "
                      f"{info.prompt_tokens + info.prompt_tokens_truncated} tokens dropped]", file=sys.stderr)
            print_stats(m.stats, budget_typed=args.budget, max_new_tokens=args.n)
    return 0


def end_line(pieces: list[str]) -> None:
    """After streamed text: end its line (unless it ended one), so what follows on a terminal starts a line."""
    if not "".join(pieces[-1:]).endswith("\n"):
        print()
    sys.stdout.flush()


def context_advice(e: ContextError, what: str) -> str:
    """A text longer than the context, in the command line's terms."""
    fixes = []
    if e.max_ctx < e.model_max:
        fixes.append(f"--max-ctx {min(e.model_max, max(e.n_tokens + 64, 2 * e.max_ctx))} (up to the model's "
                     f"{e.model_max}; under --budget it needs more memory)")
    fixes.append("--truncate left (keep its end) or right (keep its start)")
    return (f"{what} has {e.n_tokens} tokens; the context holds {e.max_ctx}"
            + ("" if e.max_ctx < e.model_max else " (the model's maximum)") + ": pass " + ", or ".join(fixes)
            + ", or shorten it")


def cmd_ppl(args) -> int:
    from .model import load
    from .perplexity import perplexity

    text = Path(args.text).read_text(encoding="utf-8") if Path(args.text).exists() else None
    if text is None:
        raise EdgeMoEError(f"{args.text}: no such file")
    with load(args.model, **load_args(args), max_ctx=args.ctx) as m:
        bar = Progress("perplexity", 1, quiet=args.quiet)

        def progress(done, total):
            bar.total = total
            bar.update(done)

        r = perplexity(m, text, ctx=args.ctx, max_tokens=args.max_tokens, progress=progress)
        bar.close()
    print(json.dumps(r) if args.json else f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens (ctx {args.ctx})")
    return 0


def cmd_fit(args) -> int:
    from .fit import fit, format_report

    if not Path(args.model).exists():
        raise EdgeMoEError(f"{args.model}: no such file")
    r = fit(args.model, args.budget, max_ctx=args.max_ctx, threads=args.threads or 1, mode=args.mode,
            precision=args.precision, kv_f16=args.kv_f16, measure=not args.no_measure)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0 if r["runs"] else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(budget=args.budget, threads=args.threads, n=args.n, workdir=args.workdir)


FINISH_TEXT = {"stop": "stopped: end of text or a stop string", "length": "stopped: -n {n} tokens",
               "context": "stopped: the context is full (--context-shift goes on, --max-ctx raises it)"}


def print_stats(st: dict, budget_typed=None, max_new_tokens: int | None = None) -> None:
    """One line of speed and memory on stderr; with a budget, a second with the expert cache's figures."""
    budget = (format_size_like(st["memory_budget_bytes"], budget_typed) if st.get("memory_budget_bytes")
              else "unlimited")
    why = FINISH_TEXT.get(st.get("finish_reason"), "").format(n=max_new_tokens)
    shifts = f", {st['context_shifts']} context shift(s)" if st.get("context_shifts") else ""
    print(f"[engine {st['engine']}] prefill {st['prefill_tokens']} tok at {st['prefill_tok_s']:.1f} tok/s, "
          f"decode {st['decode_tokens']} tok at {st['decode_tok_s']:.1f} tok/s, "
          f"peak RSS {format_bytes(st['peak_rss_bytes'])} (budget {budget}){shifts}" + (f"; {why}" if why else ""),
          file=sys.stderr)
    if st.get("cache_hit_rate") is not None:
        def pct(x):
            return "-" if x is None else f"{x:.0%}"

        per_tok = st.get("bytes_read_per_token")
        print(f"[expert cache, mode {st['mode']}] hit rate {pct(st['cache_hit_rate'])}, read "
              f"{format_bytes(per_tok) if per_tok is not None else '-'}/token, I/O stall "
              f"{pct(st['io_stall_fraction'])} of forward time, prefetch recall {pct(st['prefetch_recall'])}, "
              f"reads {st['read_mode']}" + (f" ({st['read_note']})" if st.get("read_note") else ""),
              file=sys.stderr)


# ---- the parser -----------------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs: paragraphs are re-wrapped to the terminal, indented lines (examples) kept as
    written."""

    def _fill_text(self, text, width, indent):
        out = []
        for block in re.split(r"\n\s*\n", textwrap.dedent(text).strip("\n")):
            lines = block.splitlines()
            if lines and all(not ln.startswith(" ") for ln in lines):
                out.append(textwrap.fill(" ".join(ln.strip() for ln in lines), width, initial_indent=indent,
                                         subsequent_indent=indent))
            else:
                out.append("\n".join(indent + ln for ln in lines))
        return "\n\n".join(out)


class Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)


EPILOGS = {
    "edgemoe": """
        the two commands to start with:
          edgemoe export path/to/hf-moe-model -o model.emoe --bits 4
          edgemoe run model.emoe -p "Once upon a time" --budget 1.5GB

          will it fit, and how fast?   edgemoe fit model.emoe --budget 2GB
          try it on the shipped model: edgemoe demo

        Sizes take B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024): 512MB, 1.5GB, 2GiB.
        `edgemoe COMMAND --help` explains each command's options.
        """,
    "export": """
        examples:
          edgemoe export ./OLMoE-1B-7B -o olmoe.emoe --bits 16
          edgemoe export ./OLMoE-1B-7B -o olmoe-q4.emoe --bits 4 --calib my_text.txt
          edgemoe export ./Mixtral -o merged.emoe --merge-ratio 0.5 --bits 4
          edgemoe export model.gguf -o model.emoe --bits 16 --gguf model-f16.gguf

        One pipeline for every source and option: read, calibrate, [merge], quantize, [predictor], write, one layer
        at a time. Calibration text: --calib FILE, else the model directory's calib.txt, else the exporter's shipped
        multi-domain text; --calib none fits MWQ planes to the weights alone. The pre-attention expert predictor
        (prefetching) is fitted whenever calibration runs (--no-predictor skips it).

        Progress bars go to stderr (-q hides them); a closing table shows each part's size before and after, its
        bits per weight (scales included), the merge map when experts were merged, and the time per stage. The
        output is written to OUT.tmp and renamed when complete: an interrupted export leaves no partial file.
        """,
    "info": """
        examples:
          edgemoe info model.emoe
          edgemoe info model.emoe --json | python -m json.tool
        """,
    "run": """
        examples:
          edgemoe run model.emoe -p "The capital of France is"
          edgemoe run model.emoe -p "Once upon a time" -n 200 --budget 1.5GB --threads 4
          edgemoe run model.emoe -p "Write a haiku" --temperature 0.8 --top-p 0.95 --seed 7 --stop "\\n\\n"
          edgemoe run model.emoe -p "Hello" --budget 800MB --mode adaptive --json
          edgemoe run model.emoe -p "Once upon a time" -n 5000 --max-ctx 1024 --context-shift --keep 8
          edgemoe run model.emoe -p "$(cat long.txt)" --truncate left

        The text streams to stdout; speed, peak RSS and (with a budget) the expert cache's hit rate, bytes read
        per token, I/O stall and prefetch recall go to stderr, or into the JSON with --json. Both say why the
        generation ended: stop (end of text or a stop string), length (-n tokens) or context (the context is full;
        --context-shift goes on instead).
        """,
    "chat": """
        examples:
          edgemoe chat model.emoe
          edgemoe chat model.emoe --budget 1GB --temperature 0.7 --system "You are terse."

        Type a message and press Enter. /reset forgets the conversation, /exit (or Ctrl-D) quits. The model's
        chat template is used when the container has one (without one, chat says the model is probably a base
        model); the KV cache keeps earlier turns, so each turn only runs the new text. When the conversation
        outgrows the context, the oldest turns are dropped; a reply that fills the context stops there, or with
        --context-shift drops the oldest half of the context and goes on. With --budget and no --max-ctx, the
        context is the largest whose KV cache leaves the experts at least as much of the budget (said on stderr).
        """,
    "ppl": """
        examples:
          edgemoe ppl model.emoe --text heldout.txt
          edgemoe ppl model.emoe --text heldout.txt --ctx 512 --max-tokens 8192 --budget 1GB --mode adaptive
        """,
    "bench": """
        examples:
          edgemoe bench model.emoe
          edgemoe bench model.emoe -p 512 -n 128 --threads 2 --json
          edgemoe bench model.emoe --budget 1GB --mode exact
        """,
    "analyze": """
        examples:
          edgemoe analyze model.emoe --text held_out.txt
          edgemoe analyze model.emoe --text held_out.txt --target 0.9 --heatmap routing.png --json
        """,
    "fit": """
        examples:
          edgemoe fit model.emoe --budget 2GB
          edgemoe fit model.emoe --budget 1.5GiB --max-ctx 2048 --threads 4 --json

        The runtime is opened under the budget to read its minimum and how much expert cache the budget leaves.
        Bytes read per token come from the exporter's calibration routing counts when the container has them
        (else uniform routing is assumed, and said so). The storage read bandwidth of the file itself (its expert
        pieces, page cache bypassed) and the memory bandwidth are measured in about a second. Exit status 1 when
        the model does not fit.
        """,
    "demo": """
        examples:
          edgemoe demo
          edgemoe demo --budget 6.5MB --threads 2 -n 64

        Exports the small MoE the project trained (shipped with the exporter) to 4-bit MWQ experts, loads it
        under a memory budget below its size on disk, generates from three prompts, and prints the cache
        statistics: hit rate, bytes read per token, I/O stall fraction, prefetch recall, peak RSS vs budget.
        """,
}


def _families() -> str:
    """The model families the exporter reads (its one list), for `edgemoe export --help`."""
    try:
        from edgemoe_export.families import SUPPORTED
    except ImportError:
        return "see the exporter (pip install edgemoe[export])"
    return SUPPORTED


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="edgemoe",
        description="Run large Mixture-of-Experts language models on small devices under a hard memory budget.",
        epilog=EPILOGS["edgemoe"],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    e = sub.add_parser("export", help="convert a Hugging Face MoE checkpoint into an .emoe container",
                       description="Read a Hugging Face MoE checkpoint directory (config.json, *.safetensors, "
                                   "tokenizer.json) layer by layer and write an .emoe container atomically. "
                                   f"Families (config.json model_type): {_families()}.",
                       epilog=EPILOGS["export"])
    e.add_argument("src", help="Hugging Face model directory, or a llama.cpp .gguf file")
    e.add_argument("-o", "--output", required=True, help="output .emoe file")
    e.add_argument("--bits", type=int, default=16, metavar="{32,16,8..2}",
                   help="expert storage: 32 (exact fp32), 16 (fp16), or 8..2 = MWQ nested bit planes with this many "
                        "bits in all (a --base-bits base plane plus one binary residual plane per extra bit; the "
                        "runtime can read any prefix, see `edgemoe info`); 4 is the usual choice; default 16")
    e.add_argument("--dense-bits", type=int, default=None, metavar="{32,16,8}",
                   help="storage for dense matrices: 32, 16 or 8 (Q8_0); default = --bits for 32/16, 8 when the "
                        "experts are MWQ")
    e.add_argument("--base-bits", type=int, default=2, metavar="{2,4,8}",
                   help="MWQ: bits of the base plane (per-group asymmetric codes); default 2")
    e.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="MWQ: weights per group along the input dimension, one scale per group and plane; a "
                        "multiple of 8 dividing the expert input sizes; default 128, or the largest power of two "
                        "below it that divides them")
    e.add_argument("--nesting", default="mwq", metavar="{mwq,msb}",
                   help="MWQ: how the planes are fitted: mwq = residual planes fitted to each expert's "
                        "calibration inputs (default); msb = most-significant-bit slices of per-group 8-bit codes "
                        "(comparison mode, no calibration)")
    e.add_argument("--calib", default=None, metavar="FILE|none",
                   help="calibration text for MWQ fitting, merging and the predictor (UTF-8, like the training data, "
                        "not the evaluation text); default: calib.txt in the model directory, else the exporter's "
                        "shipped multi-domain text; none = no calibration (weight-only MWQ fitting)")
    e.add_argument("--calib-tokens", type=int, default=16384, metavar="N",
                   help="calibration tokens to stream through the model (default 16384)")
    e.add_argument("--predictor", action=argparse.BooleanOptionalAction, default=None,
                   help="fit the pre-attention expert predictor the runtime prefetches with; default: yes when "
                        "calibration runs (MWQ --bits 2..8 or merging), no otherwise")
    e.add_argument("--merge-ratio", type=float, default=None, metavar="R",
                   help="keep this fraction of all experts (per-layer counts by routing frequency): the others are "
                        "dropped from routing (reap, prune) or merged into a group's shared expert (mcsmoe, "
                        "average; the router keeps every row); see --merge-method")
    e.add_argument("--experts-per-layer", type=int, default=None, metavar="N",
                   help="keep N experts per layer (as --merge-ratio)")
    e.add_argument("--merge-method", default=None, choices=("reap", "mcsmoe", "average", "prune"),
                   help="reap (default: the best measured, BENCHMARKS.md): drop the experts of least router-weighted "
                        "output (REAP); mcsmoe: align + frequency-weighted merge of groups; average: plain mean of "
                        "groups; prune: drop the least-used experts. Every method needs calibration text (not "
                        "--calib none)")
    e.add_argument("--low-rank", type=int, default=None, metavar="r", help="approximate merged experts at rank r")
    e.add_argument("--gguf", metavar="OUT.gguf", default=None,
                   help="also write a GGUF that llama.cpp runs (from the container's weights; a merged model's "
                        "groups are copied into every member's slot, since llama.cpp has no expert map, so the file "
                        "is as large as the unmerged model; pruned experts cannot be written)")
    e.add_argument("--gguf-type", default="F16", choices=("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q4_0_Q8_0"),
                   help="GGUF tensor type (default F16; Q4_K_M needs llama-cpp-python; Q4_0_Q8_0 = Q4_0 experts with "
                        "every other matrix Q8_0, the llama.cpp counterpart of MWQ experts + Q8_0 dense)")
    e.add_argument("--onnx", metavar="OUT_DIR", default=None,
                   help="also write an ONNX decoder with a KV cache (runs in onnxruntime; experts via com.microsoft.MoE)")
    e.add_argument("--onnx-weights", default="fp32", choices=("fp32", "int8", "int4"),
                   help="ONNX weights: fp32, or dense MatMuls compressed by NNCF with QMoE experts (default fp32)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="show a container's architecture, sizes and metadata", epilog=EPILOGS["info"])
    i.add_argument("model", help=".emoe file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("run", help="generate text from a prompt", epilog=EPILOGS["run"],
                       description="Continue a prompt, streaming the text to the terminal.")
    r.add_argument("model", help=".emoe file")
    r.add_argument("-p", "--prompt", required=True, help="prompt text")
    r.add_argument("-n", type=int, default=64, help="new tokens to generate at most (default 64)")
    r.add_argument("--json", action="store_true",
                   help="print text, finish_reason (stop, length or context), token counts and statistics as JSON")
    context_opts(r)
    sampling_opts(r)
    runtime_opts(r)
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("ppl", help="perplexity of a model on a text file", epilog=EPILOGS["ppl"],
                       description="Perplexity over non-overlapping windows of a UTF-8 text.")
    q.add_argument("model", help=".emoe file")
    q.add_argument("--text", required=True, help="UTF-8 text file")
    q.add_argument("--ctx", type=int, default=256, help="window length in tokens (default 256)")
    q.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    q.add_argument("--json", action="store_true")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    runtime_opts(q)
    q.set_defaults(func=cmd_ppl)

    add_tool_parsers(sub)
    from .server.command import add_serve_parser  # the web stack is an extra: imported when `serve` is parsed

    add_serve_parser(sub, runtime_opts)
    for name in ("bench", "analyze", "chat"):
        if name in sub.choices and not sub.choices[name].epilog:
            sub.choices[name].epilog = EPILOGS[name]

    f = sub.add_parser("fit", help="will a model run in a memory budget here, and how fast?", epilog=EPILOGS["fit"],
                       description="Given a memory budget, report whether the model runs (against the minimum the "
                                   "runtime demands), the expert cache it would get, the expected bytes read per "
                                   "token and the expected decode tokens/s from this machine's measured storage and "
                                   "memory bandwidth.")
    f.add_argument("model", help=".emoe file")
    f.add_argument("--budget", required=True, metavar="SIZE", help="memory budget, e.g. 2GB or 1.5GiB")
    f.add_argument("--max-ctx", type=int, default=None, metavar="N",
                   help="context length the KV cache is sized for (default: the model's, at most 4096)")
    f.add_argument("--mode", default="exact", choices=("exact", "adaptive", "ondemand"), help="runtime mode")
    f.add_argument("--threads", type=int, default=default_threads(), metavar="N",
                   help=f"compute threads (default {default_threads()}: the physical cores, as run uses)")
    f.add_argument("--precision", type=int, default=None, metavar="K",
                   help="MWQ: run experts at K bit planes (default: all stored)")
    f.add_argument("--kv-f16", action="store_true", help="f16 KV cache (half the memory)")
    f.add_argument("--no-measure", action="store_true", help="skip the bandwidth measurements (no tokens/s)")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=cmd_fit)

    d = sub.add_parser("demo", help="export the shipped small model, run it under a memory budget below its size, "
                                    "print statistics", epilog=EPILOGS["demo"])
    d.add_argument("--budget", default="auto", metavar="SIZE",
                   help="memory budget (default auto: 90%% of the exported file, or the runtime's minimum if that "
                        "is higher)")
    d.add_argument("--threads", type=int, default=None, metavar="N")
    d.add_argument("-n", type=int, default=48, help="new tokens per prompt")
    d.add_argument("--workdir", default=None, help="where to write the exported model (default: a temp dir)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command != "export" and isinstance(getattr(args, "model", None), str):
            check_model_path(args.model)  # a .gguf or checkpoint directory: point to `edgemoe export`
        return args.func(args)
    except EdgeMoEError as e:
        print(f"edgemoe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgemoe: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"edgemoe: terminated ({e})", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0
    except (OSError, MemoryError) as e:  # a file or the machine, not a bug: a message, not a traceback
        print(f"edgemoe: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: say so briefly; EDGEMOE_DEBUG=1 shows the traceback
        if os.environ.get("EDGEMOE_DEBUG"):
            raise
        print(f"edgemoe: internal error: {type(e).__name__}: {e} (set EDGEMOE_DEBUG=1 for the traceback, and "
              f"please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
