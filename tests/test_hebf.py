"""HEBF scheduling (native/src/hebf.c) on synthetic demand, against a plain-Python statement of the rule:

pieces (expert, level) are loaded level by level (every base plane before any refinement plane); within a level by
the number of tokens that need the expert at >= that level, then by the sum of their routing weights (batch 1: the
routing weight), then by expert id. A token that names one expert twice (merged experts) counts once.
"""

from __future__ import annotations

import ctypes
import importlib

import numpy as np
import pytest

N = importlib.import_module("edgemoe._native")


class Item(ctypes.Structure):
    _fields_ = [("expert", ctypes.c_int32), ("level", ctypes.c_int32), ("n_tok", ctypes.c_int32),
                ("weight", ctypes.c_float)]


try:
    _order = N._lib.emoe_hebf_order
except AttributeError:  # a library built before the streaming path
    pytest.skip("this build of the C core has no emoe_hebf_order", allow_module_level=True)
_order.restype = ctypes.c_int
_order.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_int, ctypes.POINTER(Item), ctypes.c_int, ctypes.c_void_p]


def hebf(experts, weights, levels, n_experts: int, max_levels: int) -> list[tuple[int, int, int, float]]:
    e = np.ascontiguousarray(experts, dtype=np.int32)
    w = np.ascontiguousarray(weights, dtype=np.float32)
    lv = None if levels is None else np.ascontiguousarray(levels, dtype=np.int32)
    n_tok, k = e.shape
    out = (Item * (n_experts * max_levels))()
    n = _order(n_tok, k, e.ctypes.data, w.ctypes.data, None if lv is None else lv.ctypes.data, n_experts, max_levels,
               out, len(out), None)
    assert n >= 0, f"emoe_hebf_order failed: {n}"
    return [(out[i].expert, out[i].level, out[i].n_tok, out[i].weight) for i in range(n)]


def reference(experts, weights, levels, max_levels: int) -> list[tuple[int, int]]:
    need: dict[tuple[int, int], list] = {}
    for t in range(len(experts)):
        per: dict[int, list] = {}
        for j, e in enumerate(experts[t]):
            if e < 0:
                continue
            lv = max_levels if levels is None else min(max(int(levels[t][j]), 1), max_levels)
            acc = per.setdefault(int(e), [0.0, 0])
            acc[0] += float(weights[t][j])
            acc[1] = max(acc[1], lv)
        for e, (w, lv) in per.items():
            for level in range(lv):
                c = need.setdefault((e, level), [0, 0.0])
                c[0] += 1
                c[1] += w
    keys = sorted(need, key=lambda p: (p[1], -need[p][0], -np.float32(need[p][1]), p[0]))
    return keys


def test_batch1_base_planes_first_then_by_routing_weight():
    items = hebf([[5, 2, 7, 0]], [[0.1, 0.4, 0.3, 0.2]], None, n_experts=8, max_levels=3)
    assert [(e, lv) for e, lv, _, _ in items] == [(e, lv) for lv in range(3) for e in (2, 7, 0, 5)]
    assert all(n == 1 for _, _, n, _ in items)


def test_single_plane_experts_load_in_routing_weight_order():
    items = hebf([[3, 1]], [[0.2, 0.8]], None, n_experts=4, max_levels=1)
    assert [(e, lv) for e, lv, _, _ in items] == [(1, 0), (3, 0)]


def test_batch_n_orders_by_tokens_needing_each_plane():
    # 3 tokens x top-2; per-token planes: token 0 needs e1 at 3 planes, e2 at 1; token 1: e1 at 2, e3 at 3; token 2:
    # e2 at 1, e1 at 1. Level 0: e1 (3 tokens) > e2 (2) > e3 (1); level 1: e1 (2 tokens) > e3 (1); level 2: e1 and
    # e3 one token each, e1's weight (0.5) > e3's (0.1).
    items = hebf([[1, 2], [1, 3], [2, 1]], [[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]], [[3, 1], [2, 3], [1, 1]],
                 n_experts=4, max_levels=3)
    assert [(e, lv, n) for e, lv, n, _ in items] == [(1, 0, 3), (2, 0, 2), (3, 0, 1), (1, 1, 2), (3, 1, 1),
                                                      (1, 2, 1), (3, 2, 1)]


def test_merged_expert_named_twice_counts_once():
    items = hebf([[4, 4, 1]], [[0.2, 0.3, 0.4]], None, n_experts=6, max_levels=2)
    assert [(e, lv) for e, lv, _, _ in items] == [(4, 0), (1, 0), (4, 1), (1, 1)]
    assert items[0][2] == 1 and abs(items[0][3] - 0.5) < 1e-6


def test_pruned_slots_are_ignored():
    items = hebf([[-1, 2], [2, -1]], [[0.9, 0.1], [0.3, 0.7]], None, n_experts=3, max_levels=1)
    assert [(e, lv, n) for e, lv, n, _ in items] == [(2, 0, 2)]


@pytest.mark.parametrize("seed", range(20))
def test_random_demand_matches_the_rule(seed):
    rng = np.random.default_rng(seed)
    n_tok, k, E, L = int(rng.integers(1, 65)), int(rng.integers(1, 9)), int(rng.integers(8, 65)), int(
        rng.integers(1, 5))
    k = min(k, E)
    experts = np.stack([rng.choice(E, size=k, replace=False) for _ in range(n_tok)])
    if seed % 3 == 0:  # merged layers: duplicates inside a token
        experts[:, -1] = experts[:, 0]
    weights = rng.random((n_tok, k)).astype(np.float32)
    levels = rng.integers(1, L + 1, size=(n_tok, k)) if seed % 2 else None
    items = hebf(experts, weights, levels, E, L)
    assert [(e, lv) for e, lv, _, _ in items] == reference(experts, weights, levels, L)
    # invariants the cache relies on: every expert's planes appear in ascending order, base planes first
    seen: dict[int, int] = {}
    for e, lv, _, _ in items:
        assert seen.get(e, -1) == lv - 1
        seen[e] = lv
    first_ref = next((i for i, it in enumerate(items) if it[1] > 0), len(items))
    assert all(it[1] == 0 for it in items[:first_ref])


def test_bad_input_is_an_error_not_a_crash():
    out = (Item * 2)()
    e = np.array([[9]], dtype=np.int32)
    w = np.ones((1, 1), dtype=np.float32)
    assert _order(1, 1, e.ctypes.data, w.ctypes.data, None, 8, 1, out, 2, None) < 0  # expert out of range
    e = np.array([[0, 1, 2]], dtype=np.int32)
    w = np.ones((1, 3), dtype=np.float32)
    assert _order(1, 3, e.ctypes.data, w.ctypes.data, None, 8, 1, out, 2, None) < 0  # output too small
