"""The `edgemoe` command: export, info, run, ppl, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import EdgeMoEError
from .units import format_bytes


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
    t0 = time.perf_counter()
    if args.merge_ratio is not None or args.experts_per_layer is not None:
        from edgemoe_export.merge_stage import export_merged

        out = export_merged(args.src, args.output, merge_ratio=args.merge_ratio,
                            experts_per_layer=args.experts_per_layer, method=args.merge_method,
                            calib_path=args.calib, calib_tokens=args.calib_tokens, bits=args.bits,
                            dense_bits=args.dense_bits, low_rank=args.low_rank, group_size=args.group_size,
                            base_bits=args.base_bits, show_progress=not args.quiet)
        out = Path(out)
    else:
        out = exporter.export(args.src, args.output, bits=args.bits, dense_bits=args.dense_bits,
                              show_progress=not args.quiet, base_bits=args.base_bits, group_size=args.group_size,
                              nesting=args.nesting, calib=args.calib, calib_tokens=args.calib_tokens)
    print(f"wrote {out} ({format_bytes(out.stat().st_size)}) in {time.perf_counter() - t0:.1f} s")
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
    print("  metadata " + json.dumps(c.metadata))
    c.close()
    return 0


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

    with load(args.model, memory_budget=args.budget, threads=args.threads, engine=args.engine) as m:
        pieces = []
        for piece in m.generate(args.prompt, max_new_tokens=args.n, temperature=args.temperature, stream=True):
            pieces.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
        if args.json:
            print(json.dumps({"prompt": args.prompt, "text": "".join(pieces), "stats": m.stats}))
        else:
            print()
            _print_stats(m.stats)
    return 0


def cmd_ppl(args) -> int:
    from .model import load
    from .perplexity import perplexity

    text = Path(args.text).read_text(encoding="utf-8") if Path(args.text).exists() else None
    if text is None:
        raise EdgeMoEError(f"{args.text}: no such file")
    with load(args.model, memory_budget=args.budget, threads=args.threads, engine=args.engine) as m:
        r = perplexity(m, text, ctx=args.ctx, max_tokens=args.max_tokens)
    print(json.dumps(r) if args.json else f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens (ctx {args.ctx})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(budget=args.budget, threads=args.threads, n=args.n, workdir=args.workdir)


def _print_stats(st: dict) -> None:
    budget = format_bytes(st["memory_budget_bytes"]) if st.get("memory_budget_bytes") else "unlimited"
    print(f"[engine {st['engine']}] prefill {st['prefill_tokens']} tok at {st['prefill_tok_s']:.1f} tok/s, "
          f"decode {st['decode_tokens']} tok at {st['decode_tok_s']:.1f} tok/s, "
          f"peak RSS {format_bytes(st['peak_rss_bytes'])} (budget {budget})", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe",
        description="Run large Mixture-of-Experts language models on small devices under a hard memory budget.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="convert a Hugging Face MoE checkpoint into an .emoe container",
                       description="Read a Hugging Face MoE checkpoint directory (config.json, *.safetensors, "
                                   "tokenizer.json) layer by layer and write an .emoe container atomically.")
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
    e.add_argument("--calib", default=None, metavar="FILE",
                   help="MWQ: UTF-8 calibration text (like the training data, not the evaluation text); default: "
                        "calib.txt in the model directory")
    e.add_argument("--calib-tokens", type=int, default=16384, metavar="N",
                   help="MWQ: calibration tokens to stream through the model (default 16384)")
    e.add_argument("--merge-ratio", type=float, default=None, metavar="R",
                   help="MC-SMoE: keep this fraction of all experts (per-layer counts by routing frequency); "
                        "members of a group share one merged expert, the router keeps every row")
    e.add_argument("--experts-per-layer", type=int, default=None, metavar="N", help="merge to N experts per layer")
    e.add_argument("--merge-method", default="mcsmoe", choices=("mcsmoe", "average", "prune"),
                   help="mcsmoe: align + frequency-weighted merge (default); average: plain mean; prune: drop the "
                        "least-used experts")
    e.add_argument("--low-rank", type=int, default=None, metavar="r", help="approximate merged experts at rank r")
    e.add_argument("--gguf", metavar="OUT.gguf", default=None,
                   help="also write a GGUF that llama.cpp runs (from the container's weights; a merged model's "
                        "groups are copied into every member's slot, since llama.cpp has no expert map, so the file "
                        "is as large as the unmerged model; pruned experts cannot be written)")
    e.add_argument("--gguf-type", default="F16", choices=("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"),
                   help="GGUF tensor type (default F16; Q4_K_M needs llama-cpp-python)")
    e.add_argument("--onnx", metavar="OUT_DIR", default=None,
                   help="also write an ONNX decoder with a KV cache (runs in onnxruntime; experts via com.microsoft.MoE)")
    e.add_argument("--onnx-weights", default="fp32", choices=("fp32", "int8", "int4"),
                   help="ONNX weights: fp32, or dense MatMuls compressed by NNCF with QMoE experts (default fp32)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="show a container's architecture, sizes and metadata")
    i.add_argument("model", help=".emoe file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    i.set_defaults(func=cmd_info)

    def runtime_opts(sp):
        sp.add_argument("--budget", default=None, help="memory budget, e.g. 512MB (default: unlimited)")
        sp.add_argument("--threads", type=int, default=None, help="threads for the C core (default 1)")
        sp.add_argument("--engine", default="auto", choices=("auto", "c", "numpy"), help="compute engine")

    r = sub.add_parser("run", help="generate text from a prompt")
    r.add_argument("model", help=".emoe file")
    r.add_argument("-p", "--prompt", required=True, help="prompt text")
    r.add_argument("-n", type=int, default=64, help="new tokens to generate (default 64)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--json", action="store_true", help="print text and statistics as JSON")
    runtime_opts(r)
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("ppl", help="perplexity of a model on a text file")
    q.add_argument("model", help=".emoe file")
    q.add_argument("--text", required=True, help="UTF-8 text file")
    q.add_argument("--ctx", type=int, default=256, help="window length in tokens (default 256)")
    q.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    q.add_argument("--json", action="store_true")
    runtime_opts(q)
    q.set_defaults(func=cmd_ppl)

    from .cli_tools import add_tool_parsers

    add_tool_parsers(sub, runtime_opts)

    d = sub.add_parser("demo", help="export the shipped small model, run it under a memory budget, print statistics")
    d.add_argument("--budget", default="64MB", help="memory budget (default 64MB)")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("-n", type=int, default=48, help="new tokens per prompt")
    d.add_argument("--workdir", default=None, help="where to write the exported model (default: a temp dir)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeMoEError as e:
        print(f"edgemoe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgemoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
