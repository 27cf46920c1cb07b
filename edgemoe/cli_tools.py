"""The `edgemoe` subcommands for measuring and deciding: bench, analyze, chat."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .cli_options import context_opts, generate_kwargs, load_args, runtime_opts, sampling_kwargs, sampling_opts
from .cli_progress import Progress
from .errors import ContextError, EdgeMoEError
from .units import format_bytes


def cmd_bench(args) -> int:
    from .bench import EdgeMoERunner, LlamaCppRunner, format_table, run_bench
    from .container import open_container
    from .model import load

    c = open_container(args.model, verify=False)
    limit = c.spec.max_position
    c.close()
    if args.p + args.n + 8 > limit:
        raise EdgeMoEError(f"bench -p {args.p} -n {args.n} needs a context of {args.p + args.n + 8} tokens; "
                           f"{Path(args.model).name} holds {limit}: pass a smaller -p and -n (e.g. -p {limit // 2} "
                           f"-n {limit // 4})")
    with load(args.model, memory_budget=args.budget, threads=args.threads, engine=args.engine,
              max_ctx=args.p + args.n + 8, mode=getattr(args, "mode", "exact"), precision=args.precision) as m:
        runners = [EdgeMoERunner(m)]
        if args.vs_llama_cpp:
            runners.append(LlamaCppRunner(args.vs_llama_cpp, args.threads or 1, args.p + args.n + 8))
        if args.vs_onnx:
            from .bench_onnx import OnnxRunner

            runners.append(OnnxRunner(args.vs_onnx, args.threads or 1, spec=m.spec))
        say = None if args.json else (lambda s: print(s, file=sys.stderr))
        results = run_bench(runners, m.spec.vocab, n_prompt=args.p, n_gen=args.n, reps=args.r,
                            threads=args.threads or 1, progress=say)
        stats = m.stats
    name = Path(args.model).name
    files = {"edgemoe": name}  # each row names the file its engine ran
    if args.vs_llama_cpp:
        files["llama.cpp"] = Path(args.vs_llama_cpp).name
    if args.vs_onnx:
        files["onnxruntime"] = str(Path(Path(args.vs_onnx).parent.name) / Path(args.vs_onnx).name)
    if args.json:
        print(json.dumps({"model_filename": name, "engine_c": stats["engine"], "prompt": "random token ids, seed 0",
                          "peak_rss_bytes": stats["peak_rss_bytes"],
                          "results": [{**r.to_json(), "model_filename": files.get(r.engine, name)} for r in results]},
                         indent=2))
    else:
        print(format_table(results, files))
        print(f"(prompt: random token ids, seed 0; edgemoe engine {stats['engine']}; "
              f"peak RSS {format_bytes(stats['peak_rss_bytes'])})")
    return 0


def collect_routes(model, ids: list[int], ctx: int, progress=None) -> list[np.ndarray]:
    """Experts chosen per token and layer over a text, with the NumPy engine's routing hook. progress(done, total)
    after each window."""
    engine = model.reference_engine()
    routes: dict[int, list[np.ndarray]] = {}
    for start in range(0, len(ids), ctx):
        window = ids[start : start + ctx]
        engine.logits(window, on_route=lambda layer, e, w: routes.setdefault(layer, []).append(e))
        if progress is not None:
            progress(start + len(window), len(ids))
    return [np.concatenate(routes[layer]) for layer in sorted(routes)]


def cmd_analyze(args) -> int:
    from .analyze import (
        decode_requests,
        entropy_bits,
        expert_pieces,
        lru_hit_rate,
        segment_cache_hit_rate,
        segment_routing_best_f1,
        smallest_cache_for,
        usage,
    )
    from .model import load
    from .png import labelled_heatmap, write_png

    text_path = Path(args.text)
    if not text_path.exists():
        raise EdgeMoEError(f"{text_path}: no such file")
    with load(args.model, engine="numpy") as m:
        if m.tokenizer is None:
            raise EdgeMoEError(f"{args.model}: no tokenizer embedded; analyze needs one")
        ids = m.tokenizer.encode(text_path.read_text(encoding="utf-8", errors="replace"))[: args.max_tokens]
        bar = Progress("routing", len(ids), quiet=args.quiet or args.json)
        routes = collect_routes(m, ids, args.ctx, lambda done, total: bar.update(done))
        bar.close()
        s = m.spec
        tensors = dict(m.container.tensors)
    moe_layers = [layer for layer in range(s.n_layers) if s.is_moe_layer(layer)]
    stored_routes = []  # routed -> stored experts (merged models): the cache holds stored ones
    for layer, r in zip(moe_layers, routes):
        emap = s.layer_expert_map(layer)
        stored_routes.append(np.asarray(emap)[r] if emap else r)
    requests = decode_requests(stored_routes, moe_layers,
                               lambda layer, e: expert_pieces(tensors, layer, e, args.precision))
    all_pieces = sum(sum(sz for _, sz, _ in expert_pieces(tensors, layer, e, args.precision))
                     for layer in moe_layers for e in range(s.stored_experts(layer)))
    one_layer = max(sum(sz for _, sz, _ in expert_pieces(tensors, layer, 0, args.precision)) for layer in moe_layers)
    cache, rate = smallest_cache_for(requests, args.target, one_layer, all_pieces)
    fixed, parts = _budget_fixed_part(args)
    u = usage(routes, s.n_experts)
    out_png = Path(args.heatmap or Path(args.model).with_suffix(".routing.png"))
    write_png(out_png, labelled_heatmap(u, f"expert usage per layer: {len(ids)} tokens of {text_path.name}",
                                        scale_label="share of the layer's expert choices (top-k per token)"))
    k, m_seg = s.top_k, args.segment
    layers = []
    for layer, r in enumerate(routes):
        f1, size = segment_routing_best_f1(r, s.n_experts, m_seg)
        layers.append({
            "layer": layer, "usage": [round(float(x), 4) for x in u[layer]],
            "entropy_bits": round(float(entropy_bits(u[layer])), 3),
            "lru_hit_rate": {c: round(lru_hit_rate(r, c), 3) for c in sorted({k, 2 * k, 3 * k, s.n_experts})
                             if c <= s.n_experts},
            "sch_rho2": round(segment_cache_hit_rate(r, min(2 * k, s.n_experts), m_seg), 3),
            "srp_f1": round(f1, 3), "srp_size_ratio": round(size, 2),
        })
    budget = fixed + cache
    report = {"model": str(args.model), "tokens": len(ids), "segment": m_seg, "layers": layers, "heatmap": str(out_png),
              "recommendation": {"expert_cache_bytes": int(cache), "expected_hit_rate": round(rate, 4),
                                 "memory_budget_bytes": int(budget), "budget_parts": {**parts, "expert_cache": cache},
                                 "target_hit_rate": args.target, "mode": "ondemand", "max_ctx": args.max_ctx,
                                 "precision": args.precision,
                                 "model": "decode one token at a time, plane-granular byte-budgeted LRU "
                                          "(edgemoe.analyze.runtime_lru_hit_rate)"}}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{len(ids)} tokens of {text_path.name}; heatmap -> {out_png}")
    print("| layer | entropy (bits) | LRU hit rate by experts cached | SCH (rho=2) | SRP F1 (size) |")
    print("|---|---|---|---|---|")
    for d in layers:
        lru = ", ".join(f"{c}: {v:.2f}" for c, v in d["lru_hit_rate"].items())
        print(f"| {d['layer']} | {d['entropy_bits']:.2f} | {lru} | {d['sch_rho2']:.2f} | "
              f"{d['srp_f1']:.2f} ({d['srp_size_ratio']:.1f}x k) |")
    met = ">=" if rate >= args.target else "<, the most any budget gives:"
    print(f"recommendation: memory_budget={budget} ({format_bytes(budget)}): expected on-demand LRU hit rate "
          f"{rate:.1%} {met} {args.target:.0%} when decoding, with an expert cache of {format_bytes(cache)} "
          f"(dense {format_bytes(parts['dense'])} + KV cache for max_ctx {parts['max_ctx']} "
          f"{format_bytes(parts['kv_cache'])} + scratch {format_bytes(parts['scratch'])} + expert cache)")
    return 0


def _budget_fixed_part(args) -> tuple[int, dict]:
    """What a budget holds besides the expert cache (dense weights, KV cache for max_ctx, scratch) as the C core
    accounts it: open the model on the streaming engine without a limit and read its budget parts."""
    from .model import load

    kw = {"max_ctx": args.max_ctx} if args.max_ctx else {}
    with load(args.model, mode="ondemand", threads=args.threads, precision=args.precision, **kw) as m:
        parts = m.stats["budget_parts"]
        max_ctx = m.max_ctx
    out = {"dense": parts["dense"], "kv_cache": parts["kv_cache"], "scratch": parts["scratch"], "max_ctx": max_ctx}
    return parts["dense"] + parts["kv_cache"] + parts["scratch"], out


CHAT_COMMANDS = {"/exit": "quit", "/quit": "quit", "/reset": "forget the conversation", "/help": "this list"}


def cmd_chat(args) -> int:
    from .model import load

    with load(args.model, **load_args(args)) as m:
        if m.tokenizer is None:
            raise EdgeMoEError(f"{args.model}: no tokenizer embedded; chat needs one")
        sampling = {**sampling_kwargs(args, m.generate), **generate_kwargs(args)}
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages: list[dict] = []
        if m.chat_template is None:
            print(f"edgemoe chat: {Path(args.model).name} has no chat template, so it is probably a base model (not "
                  f"trained to chat): it continues a plain 'User: ... Assistant:' transcript, and its replies may not "
                  f"read like answers", file=sys.stderr)
        print("edgemoe chat: type a message; /reset forgets, /exit or Ctrl-D quits", file=sys.stderr)
        while True:
            line = _read_line()
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            if line.strip() == "/reset":
                messages.clear()
                m.reset()
                print("(conversation forgotten)", file=sys.stderr)
                continue
            if line.strip() == "/help":
                print("\n".join(f"  {k:7s} {v}" for k, v in CHAT_COMMANDS.items()), file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            reply = _chat_turn(m, system, messages, args.n, sampling)
            if reply is None:  # even the newest message alone does not fit: it was dropped
                messages.pop()
                continue
            messages.append({"role": "assistant", "content": reply})
    return 0


def _read_line() -> str | None:
    try:
        return input("> ")
    except EOFError:
        print(file=sys.stderr)
        return None


def _chat_turn(m, system: list[dict], messages: list[dict], n: int, sampling: dict) -> str | None:
    """Stream one reply; when the conversation outgrows the context, drop the oldest exchanges and retry."""
    while True:
        try:
            pieces = m.chat(system + messages, max_new_tokens=n, stream=True, **sampling)
            reply = []
            for piece in pieces:
                reply.append(piece)
                print(piece, end="", flush=True)
            if not "".join(reply[-1:]).endswith("\n"):
                print()
            if pieces.finish_reason == "context":
                print("[the reply filled the context: --context-shift goes on past it, --max-ctx raises it]",
                      file=sys.stderr)
            return "".join(reply).strip()
        except ContextError as e:
            if len(messages) <= 1:
                print(f"edgemoe: the message has {e.n_tokens} tokens with the chat template; the context holds "
                      f"{e.max_ctx} (--max-ctx raises it up to the model's {e.model_max}); message dropped",
                      file=sys.stderr)
                return None
            del messages[:2]  # the oldest user message and its reply


def add_tool_parsers(sub) -> None:
    b = sub.add_parser("bench", help="llama-bench-shaped prompt (pp) and generation (tg) speed",
                       description="Measure prompt processing (ppN) and generation (tgN) tokens/s, 5 repetitions "
                                   "after a warm-up; with --vs-llama-cpp / --vs-onnx, run llama.cpp on a GGUF / "
                                   "onnxruntime on an ONNX export of the same model, interleaved in the same process "
                                   "with the same prompt, token counts and threads, and print the ratios. "
                                   "Example: edgemoe bench m.emoe -p 512 -n 128 --threads 2 --vs-llama-cpp m.gguf "
                                   "--vs-onnx onnx_dir/model.onnx")
    b.add_argument("model", help=".emoe file")
    b.add_argument("-p", type=int, default=512, help="prompt tokens (pp test; 0 = skip; default 512)")
    b.add_argument("-n", type=int, default=128, help="generated tokens (tg test; 0 = skip; default 128)")
    b.add_argument("-r", type=int, default=5, help="repetitions (default 5)")
    b.add_argument("--vs-llama-cpp", metavar="GGUF", default=None, help="also run llama.cpp on this GGUF")
    b.add_argument("--vs-onnx", metavar="ONNX", default=None,
                   help="also run onnxruntime (CPU, intra-op threads = --threads) on this model.onnx "
                        "(from edgemoe export --onnx)")
    b.add_argument("--json", action="store_true", help="JSON with llama-bench field names")
    runtime_opts(b)
    b.set_defaults(func=cmd_bench)

    a = sub.add_parser("analyze", help="routing statistics to decide how to deploy (cache size, budget)",
                       description="Route a text through the model and report per-layer expert usage (a heatmap "
                                   "PNG: layers down, experts across, darker = chosen more often), the hit rate an "
                                   "LRU expert cache would reach, the local routing consistency metrics SCH and SRP "
                                   "(arXiv 2505.16056), and the smallest cache / memory budget whose expected hit "
                                   "rate passes the target.",
                       epilog="""
        examples:
          edgemoe analyze m.emoe --text held_out.txt
          edgemoe analyze m.emoe --text held_out.txt --target 0.9 --heatmap routing.png --json

        The columns of the table:
          entropy   how evenly a layer spreads its choices: log2(experts) bits = uniform, lower = a few experts
                    dominate (a cache of those few hits often).
          LRU       hit rate of a per-layer cache of C experts, evicting the least recently used, for each C.
          SCH       segment cache hit rate: an oracle cache of rho x top-k experts (rho = 2) that on a miss evicts
                    the expert used least in the next --segment tokens: the best any cache of that size could do
                    with perfect foresight. High SCH = routing is local in time, so caching and prefetch pay off.
          SRP       segment routing best performance: the best F1 of one fixed expert set per --segment tokens
                    against the true choices, and that set's size in multiples of top-k. High F1 at a small size =
                    a segment needs few distinct experts.
        """)
    a.add_argument("model", help=".emoe file")
    a.add_argument("--text", required=True, help="UTF-8 text (real text: random ids make routing uniform)")
    a.add_argument("--max-tokens", type=int, default=4096, help="tokens to analyze (default 4096)")
    a.add_argument("--ctx", type=int, default=256, help="window length (default 256)")
    a.add_argument("--segment", type=int, default=16, help="segment length m for SCH/SRP (default 16)")
    a.add_argument("--target", type=float, default=0.8, help="target hit rate (default 0.8)")
    a.add_argument("--max-ctx", type=int, default=None, metavar="N",
                   help="context the recommended budget reserves a KV cache for (default: as edgemoe.load)")
    a.add_argument("--threads", type=int, default=None, help="threads the budget's scratch is sized for")
    a.add_argument("--precision", type=int, default=None, metavar="K", help="MWQ experts: planes run (default all)")
    a.add_argument("--heatmap", default=None, help="PNG path (default: MODEL.routing.png)")
    a.add_argument("--json", action="store_true")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    a.set_defaults(func=cmd_analyze)

    c = sub.add_parser("chat", help="interactive chat loop with history",
                       description="An interactive conversation with the model, one reply per line you type.")
    c.add_argument("model", help=".emoe file")
    c.add_argument("-n", type=int, default=256, help="max tokens per reply (default 256)")
    c.add_argument("--system", default=None, metavar="TEXT", help="a system message opening the conversation")
    context_opts(c, chat=True)
    sampling_opts(c)
    runtime_opts(c)
    c.set_defaults(func=cmd_chat)
