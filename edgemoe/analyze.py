"""Routing analysis: what a user needs to decide how to deploy a model on a small device.

From the experts chosen for every token of a text, per layer:
- usage: how often each expert is selected (and its entropy),
- the LRU hit rate an expert cache of C experts per layer would reach,
- the local routing consistency metrics of "Not All Models Suit Expert Offloading" (arXiv 2505.16056):
  SCH, the hit rate of an oracle cache of rho*k experts that evicts the expert used least in the next m tokens, and
  SRP, the best F1 of a segment router that activates one fixed expert set for each m-token segment.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


def usage(routes: list[np.ndarray], n_experts: int) -> np.ndarray:
    """routes[l]: [T, k] expert ids -> [layers, E] selection fractions."""
    return np.stack([np.bincount(r.reshape(-1), minlength=n_experts) / r.size for r in routes])


def entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1)
    return -(p * np.log2(p)).sum(axis=-1)


def lru_hit_rate(route: np.ndarray, capacity: int) -> float:
    """Hit rate of a per-layer LRU cache of `capacity` experts over a [T, k] route (token order)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for row in route:
        for e in (int(x) for x in row):
            total += 1
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                cache[e] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / max(total, 1)


def segment_cache_hit_rate(route: np.ndarray, capacity: int, m: int) -> float:
    """SCH: oracle cache of `capacity` experts; on a miss it evicts the expert used least in the next m tokens."""
    T = len(route)
    cache: set[int] = set()
    hits = total = 0
    for t in range(T):
        future = route[t + 1 : t + 1 + m].reshape(-1)
        for e in (int(x) for x in route[t]):
            total += 1
            if e in cache:
                hits += 1
                continue
            if len(cache) >= capacity:
                counts = {c: int(np.sum(future == c)) for c in cache if c not in route[t]}
                if counts:
                    cache.remove(min(counts, key=lambda c: (counts[c], c)))
            if len(cache) < capacity:
                cache.add(e)
    return hits / max(total, 1)


def segment_routing_best_f1(route: np.ndarray, n_experts: int, m: int) -> tuple[float, float]:
    """SRP: per segment of m tokens, activate the experts whose count in the segment passes a threshold; the best
    threshold by micro-F1 against the true per-token selections. Returns (F1, activated-set size / k)."""
    T, k = route.shape
    best = (0.0, 0.0)
    segs = [route[s : s + m] for s in range(0, T, m)]
    counts = [np.bincount(s.reshape(-1), minlength=n_experts) for s in segs]
    for thr in range(1, m + 1):
        tp = fp = fn = 0
        size = 0
        for s, c in zip(segs, counts):
            active = c >= thr
            size += active.sum()
            sel = np.zeros((len(s), n_experts), bool)
            np.put_along_axis(sel, s, True, axis=1)
            tp += int((sel & active[None]).sum())
            fp += int((~sel & active[None]).sum())
            fn += int((sel & ~active[None]).sum())
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        if f1 > best[0]:
            best = (f1, size / len(segs) / k)
    return best


def recommend_capacity(routes: list[np.ndarray], n_experts: int, target: float = 0.8) -> tuple[int, float]:
    """Smallest per-layer LRU capacity (experts) whose mean hit rate over layers reaches `target`."""
    for c in range(1, n_experts + 1):
        rate = float(np.mean([lru_hit_rate(r, c) for r in routes]))
        if rate >= target:
            return c, rate
    return n_experts, 1.0


# ---------------------------------------------------------------------------------------------------------------
# The runtime's expert cache, modelled: what `edgemoe.load(path, memory_budget=B, mode="ondemand")` does when it
# decodes a text one token at a time (native/src/hebf.c, expert_cache.c). One byte-budgeted cache shared by all
# layers; its unit is a piece = one plane of one expert matrix (f32/f16/q8_0 matrices: the whole matrix; MWQ: each bit
# plane) charged at its 4 KiB-aligned slot size; per MoE layer the routed stored experts are loaded in expert order,
# each as one all-or-nothing request of its pieces (plane by plane, gate/up/down); plain LRU eviction, refinement
# planes before base planes, never a piece the request has already placed (its later ones may go, and then miss).
# Hit rate = pieces found resident / pieces requested, the runtime's m.stats["cache_hit_rate"].

SLOT_ALIGN = 4096  # native/src/io_thread.h EMOE_IO_ALIGN: slots are rounded up to it
EXPERT_MATRICES = ("ffn_gate", "ffn_up", "ffn_down")  # the order of a request's pieces (hebf.c pid)


def slot_bytes(nbytes: int) -> int:
    return (int(nbytes) + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN


def expert_pieces(tensors: dict, layer: int, expert: int, planes: int | None = None) -> list[tuple[str, int, bool]]:
    """The pieces one request for stored expert `expert` of `layer` pins: [(key, slot bytes, is refinement plane)],
    plane by plane, gate/up/down within a plane. `tensors`: the container's TensorInfo by name; `planes`: MWQ planes
    run (None = all stored)."""
    infos = [tensors[f"blk.{layer}.expert.{expert}.{m}.weight"] for m in EXPERT_MATRICES]
    n = max(1, infos[0].n_planes)
    n = min(n, planes) if planes else n
    out = []
    for p in range(n):
        for m, t in zip(EXPERT_MATRICES, infos):
            size = t.planes[p]["nbytes"] if t.planes else t.nbytes
            out.append((f"{layer}.{expert}.{m}.{p}", slot_bytes(size), p > 0))
    return out


def decode_requests(routes: list[np.ndarray], moe_layers: list[int], pieces_of) -> list[list[tuple[str, int, bool]]]:
    """The cache requests of decoding the routed tokens one at a time: per token, per MoE layer in order, one request
    per distinct routed stored expert in ascending order. routes[i]: [T, k] stored expert ids of layer moe_layers[i];
    pieces_of(layer, expert) -> expert_pieces(...)."""
    if len(routes) != len(moe_layers):
        raise ValueError(f"{len(routes)} routed layers for {len(moe_layers)} MoE layers")
    T = min((len(r) for r in routes), default=0)
    memo: dict[tuple[int, int], list] = {}
    reqs = []
    for t in range(T):
        for r, layer in zip(routes, moe_layers):
            for e in sorted({int(x) for x in r[t] if int(x) >= 0}):
                key = (layer, e)
                if key not in memo:
                    memo[key] = pieces_of(layer, e)
                reqs.append(memo[key])
    return reqs


def runtime_lru_hit_rate(requests: list[list[tuple[str, int, bool]]], capacity_bytes: int) -> float:
    """Hit rate of the runtime's on-demand cache of `capacity_bytes` over `requests` (see decode_requests)."""
    refine: OrderedDict[str, int] = OrderedDict()  # LRU order, least recent first
    base: OrderedDict[str, int] = OrderedDict()
    used = hits = total = 0
    for req in requests:
        pinned: set[str] = set()  # the request's pieces already placed (the runtime pins them in order)
        if sum(s for _, s, _ in req) > capacity_bytes:
            raise ValueError(f"one expert's pieces ({sum(s for _, s, _ in req)} bytes) exceed the cache of "
                             f"{capacity_bytes} bytes")
        for k, size, is_ref in req:
            total += 1
            keys = pinned
            pinned.add(k)
            lru = refine if is_ref else base
            if k in lru:
                hits += 1
                lru.move_to_end(k)
                continue
            while used + size > capacity_bytes:  # refinement planes first, then base planes; not this request's
                victim = next((v for v in refine if v not in keys), None)
                src = refine
                if victim is None:
                    victim, src = next(v for v in base if v not in keys), base
                used -= src.pop(victim)
            lru[k] = size
            used += size
    return hits / max(total, 1)


def smallest_cache_for(requests: list[list[tuple[str, int, bool]]], target: float, lo: int, hi: int
                       ) -> tuple[int, float]:
    """The smallest cache (bytes, a multiple of SLOT_ALIGN in [lo, hi]) whose runtime_lru_hit_rate reaches `target`,
    and that rate; (hi, its rate) if none does. LRU keeps the pieces of a smaller cache in a larger one, so the rate
    grows with the size and a bisection finds the threshold."""
    lo, hi = slot_bytes(lo), max(slot_bytes(lo), hi // SLOT_ALIGN * SLOT_ALIGN)
    top = runtime_lru_hit_rate(requests, hi)
    if top < target:
        return hi, top
    best = (hi, top)
    while lo < hi:
        mid = (lo + hi) // 2 // SLOT_ALIGN * SLOT_ALIGN
        rate = runtime_lru_hit_rate(requests, mid)
        if rate >= target:
            best, hi = (mid, rate), mid
        else:
            lo = mid + SLOT_ALIGN
    return best
