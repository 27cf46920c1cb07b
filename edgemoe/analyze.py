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
