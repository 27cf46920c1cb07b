"""`edgemoe fit MODEL --budget 2GB`: will this model run in this budget on this machine, and how fast?

The answer is assembled from three measured things, never from constants:
1. what the runtime demands: the C core itself is opened under the budget (as `edgemoe.load` would) and states the
   minimum, the resident parts (dense weights, KV cache, scratch) and the expert cache it would get;
2. which expert bytes a token needs and how many of them the cache holds: the container's sizes, and the routing
   counts the exporter recorded on calibration text (`metadata["export_summary"]["routing"]`), or, without them,
   uniform routing (said so in the report);
3. the machine: the read bandwidth of this very file (its expert pieces, page cache bypassed) and the memory read
   bandwidth, each measured in well under a second.

Decode at batch 1 is bandwidth-bound: a token touches the dense weights, its top-k experts per layer and the KV
cache (memory bandwidth), and reads the experts the cache misses (storage bandwidth). Reads overlap computation
when the prefetch predicts well; the report gives tokens/s for no overlap (a floor) and full overlap (a ceiling).
"""

from __future__ import annotations

from pathlib import Path

from .bandwidth import IO_ALIGN, memory_read_bandwidth, storage_read_bandwidth
from .container import Container, open_container
from .errors import EdgeMoEError
from .procfs import mem_available_bytes, rss_bytes
from .units import format_bytes, parse_bytes


# ---- what the runtime demands ------------------------------------------------------------------------------------
def runtime_requirements(path: str | Path, spec, budget: int, max_ctx: int, threads: int = 1, mode: str = "exact",
                         precision: int | None = None, kv_f16: bool = False) -> dict:
    """Open the C streaming engine under `budget` and return its figures (it reads the dense weights, as a real
    load does). Below the minimum: {"runs": False, "minimum_bytes", "message"} from the core's refusal (its plan)."""
    from . import _native as N
    from .engine_c import CEngine

    try:
        eng = CEngine.open_streaming(path, spec, budget, mode, threads=threads, max_ctx=max_ctx, kv_f16=kv_f16,
                                     precision=precision, verify="never")
    except N.BudgetError as e:
        return {"runs": False, "minimum_bytes": e.plan["minimum_bytes"], "message": str(e)}
    try:
        s = eng.stats()
    finally:
        eng.close()
    return {"runs": True, "minimum_bytes": s["minimum_bytes"], "dense_bytes": s["dense_bytes"],
            "kv_bytes": s["kv_bytes"], "scratch_bytes": s["scratch_bytes"],
            "expert_cache_bytes": s["cache_capacity_bytes"], "run_planes": s["run_planes"] or s["n_planes"]}


def minimum_budget_bytes(path: str | Path, max_ctx: int, threads: int = 1, mode: str = "exact",
                         precision: int | None = None, kv_f16: bool = False) -> int:
    """The least budget the C core accepts for this model and context (its plan; nothing is loaded)."""
    from .engine_c import CEngine

    return CEngine.stream_plan(path, max_ctx, kv_f16, threads, mode=mode, precision=precision)["minimum_bytes"]


# ---- which expert bytes a token needs --------------------------------------------------------------------------
def expert_piece_bytes(c: Container, run_planes: int | None, slots: bool = False) -> dict[tuple[int, int], int]:
    """(layer, stored expert) -> bytes of its three matrices at `run_planes` planes: as read from the file, or with
    slots=True as the cache allocates them (each piece rounded up to the 4 KiB slot granularity)."""
    out: dict[tuple[int, int], int] = {}
    for name, t in c.tensors.items():
        if t.kind != "expert":
            continue
        parts = name.split(".")  # blk.L.expert.E.ffn_x.weight
        key = (int(parts[1]), int(parts[3]))
        if t.planes:
            pieces = [p["nbytes"] for p in t.planes[: run_planes or len(t.planes)]]
        else:
            pieces = [t.nbytes]
        out[key] = out.get(key, 0) + sum(-(-n // IO_ALIGN) * IO_ALIGN if slots else n for n in pieces)
    return out


def routing_probabilities(c: Container) -> tuple[dict[tuple[int, int], float] | None, int | None]:
    """(layer, stored expert) -> probability a token uses it, from the exporter's calibration counts; (None, None)
    when the container has none."""
    routing = (c.metadata.get("export_summary") or {}).get("routing") or {}
    counts, n = routing.get("expert_tokens"), routing.get("calib_tokens")
    if not counts or not n:
        return None, None
    probs = {}
    for layer, row in enumerate(counts):
        for e, k in enumerate(row or []):
            probs[(layer, e)] = min(1.0, k / n)
    return probs, int(n)


def expected_reads(sizes: dict[tuple[int, int], int], slots: dict[tuple[int, int], int],
                   probs: dict[tuple[int, int], float], capacity: int) -> dict:
    """Expected expert bytes a token needs and reads, when the cache (`capacity` bytes of `slots`) keeps the
    experts most likely to be used per byte: the steady state a frequency-aware cache approaches (temporal locality
    in real text only helps it; a cache smaller than one token's experts does worse)."""
    need = sum(probs.get(k, 0.0) * b for k, b in sizes.items())
    cached = 0
    hit_bytes = 0.0
    for key in sorted(sizes, key=lambda k: probs.get(k, 0.0) / slots[k], reverse=True):
        if cached + slots[key] > capacity:
            continue
        cached += slots[key]
        hit_bytes += probs.get(key, 0.0) * sizes[key]
    return {"expert_bytes_per_token": need, "bytes_read_per_token": max(0.0, need - hit_bytes),
            "expected_hit_rate": hit_bytes / need if need else 1.0, "experts_cached_bytes": cached}


def uniform_probabilities(sizes: dict[tuple[int, int], int], top_k: int) -> dict[tuple[int, int], float]:
    per_layer: dict[int, int] = {}
    for layer, _ in sizes:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    return {(layer, e): min(1.0, top_k / per_layer[layer]) for layer, e in sizes}


# ---- the report --------------------------------------------------------------------------------------------------
def fit(path: str | Path, budget, max_ctx: int | None = None, threads: int = 1, mode: str = "exact",
        precision: int | None = None, kv_f16: bool = False, measure: bool = True) -> dict:
    """Whether `path` runs in `budget` on this machine, its expected expert cache, bytes read and tokens/s."""
    budget_bytes = parse_bytes(budget)
    if budget_bytes is None:
        raise EdgeMoEError("fit needs a memory budget, e.g. --budget 2GB")
    path = Path(path)
    c = open_container(path, verify=False)
    # The budget bounds the C core's memory; the Python process around it (interpreter, NumPy, the C core library,
    # the container's index) comes on top: measured here, before the model, as `edgemoe run` holds it
    outside = rss_bytes()
    try:
        s = c.spec
        ctx = int(max_ctx or min(s.max_position, 4096))
        req = runtime_requirements(path, s, budget_bytes, ctx, threads, mode, precision, kv_f16)
        report: dict = {"model": str(path), "file_bytes": path.stat().st_size, "budget_bytes": budget_bytes,
                        "max_ctx": ctx, "mode": mode, "threads": threads, **req}
        if outside is not None:
            report["process_overhead_bytes"] = outside
            report["process_total_bytes"] = budget_bytes + outside
        avail = mem_available_bytes()
        if avail is not None:
            report["memory_available_bytes"] = avail
        if not req["runs"]:
            return report
        sizes = expert_piece_bytes(c, req["run_planes"])
        slots = expert_piece_bytes(c, req["run_planes"], slots=True)
        probs, calib_tokens = routing_probabilities(c)
        if probs is None:
            probs = uniform_probabilities(sizes, s.top_k)
            report["routing"] = "uniform (the container has no calibration routing counts: an assumption)"
        else:
            report["routing"] = f"calibration counts over {calib_tokens} tokens"
        reads = expected_reads(sizes, slots, probs, req["expert_cache_bytes"])
        total_experts = sum(slots.values())
        report.update(reads)
        report["expert_bytes_total"] = total_experts
        report["expert_cache_fraction"] = min(1.0, req["expert_cache_bytes"] / total_experts) if total_experts else 1.0
        embed = c.tensors.get("token_embd.weight")
        dense_touched = req["dense_bytes"] - (embed.nbytes - embed.nbytes // s.vocab if embed is not None else 0)
        kv_touched = req["kv_bytes"] / 2  # on average over a full context, half the KV cache is read per token
        report["memory_bytes_per_token"] = int(dense_touched + reads["expert_bytes_per_token"] + kv_touched)
        if measure:
            pieces = [(p["offset"], p["nbytes"]) for t in c.tensors.values() if t.kind == "expert"
                      for p in (t.planes or [{"offset": t.offset, "nbytes": t.nbytes}])]
            report["storage_read"] = storage_read_bandwidth(path, pieces)
            report["memory_read"] = memory_read_bandwidth()
            t_mem = report["memory_bytes_per_token"] / report["memory_read"]["bytes_per_s"]
            sbw = report["storage_read"]["bytes_per_s"]
            t_io = reads["bytes_read_per_token"] / sbw if sbw > 0 else float("inf")
            report["seconds_per_token"] = {"memory": t_mem, "storage": t_io}
            report["tokens_per_s"] = {"no_overlap": 1.0 / (t_mem + t_io) if t_mem + t_io > 0 else None,
                                      "full_overlap": 1.0 / max(t_mem, t_io) if max(t_mem, t_io) > 0 else None}
        return report
    finally:
        c.close()


def format_report(r: dict) -> str:
    name = Path(r["model"]).name
    lines = [(f"{name} ({format_bytes(r['file_bytes'])} on disk), budget {format_bytes(r['budget_bytes'])}, "
              f"max_ctx {r['max_ctx']}, mode {r['mode']}, {r['threads']} thread(s)")]
    if not r["runs"]:
        mn = r.get("minimum_bytes")
        lines.append(f"does NOT run: the runtime needs at least {format_bytes(mn) if mn else '?'}"
                     f"{f' ({mn} bytes)' if mn else ''} for this context")
        lines.append(f"  {r['message']}")
        return "\n".join(lines)
    lines.append(f"runs: minimum {format_bytes(r['minimum_bytes'])} ({r['minimum_bytes']} bytes); resident: dense "
                 f"{format_bytes(r['dense_bytes'])} + KV cache {format_bytes(r['kv_bytes'])} + scratch "
                 f"{format_bytes(r['scratch_bytes'])}")
    if "process_total_bytes" in r:
        lines.append(f"process total: about {format_bytes(r['process_total_bytes'])} = the budget (the C core: dense, "
                     f"KV cache, scratch, expert cache) + {format_bytes(r['process_overhead_bytes'])} this Python "
                     f"process holds besides (measured now); cap a container or cgroup at that")
    lines.append(f"expert cache: {format_bytes(r['expert_cache_bytes'])} = {r['expert_cache_fraction']:.0%} of the "
                 f"experts ({format_bytes(r['expert_bytes_total'])} in cache slots at {r['run_planes']} plane(s))")
    lines.append(f"routing: {r['routing']}")
    lines.append(f"per token: experts needed {format_bytes(r['expert_bytes_per_token'])}, expected hit rate "
                 f"{r['expected_hit_rate']:.0%} of those bytes, read from storage {format_bytes(r['bytes_read_per_token'])}; "
                 f"memory touched {format_bytes(r['memory_bytes_per_token'])}")
    if "storage_read" in r:
        st, mem = r["storage_read"], r["memory_read"]
        lines.append(f"machine: storage read {st['bytes_per_s'] / 1e9:.2f} GB/s (this file's expert pieces, "
                     f"{st['method']}, {st['threads']} threads, {format_bytes(st['bytes'])} in {st['seconds']:.2f} s); "
                     f"memory read {mem['bytes_per_s'] / 1e9:.1f} GB/s")
        tps = r["tokens_per_s"]
        lines.append(f"expected decode: {tps['no_overlap']:.1f} tok/s (reads not overlapped) to "
                     f"{tps['full_overlap']:.1f} tok/s (reads fully hidden by prefetch); bandwidth bounds for cold "
                     f"storage (the kernels reach a fraction; reads the page cache serves are faster)")
    avail = r.get("memory_available_bytes")
    if avail is not None and r["budget_bytes"] > avail:
        lines.append(f"warning: the budget exceeds the memory available now ({format_bytes(avail)})")
    return "\n".join(lines)
