"""Routing analysis: the metrics on synthetic routes with known answers, the runtime cache model, and `edgemoe analyze`
on the small trained model against the hit rate the runtime measures at the budget it recommends (issue 8)."""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from subprocess_python import PYTHON

from edgemoe.analyze import (
    decode_requests,
    lru_hit_rate,
    recommend_capacity,
    runtime_lru_hit_rate,
    segment_cache_hit_rate,
    segment_routing_best_f1,
    slot_bytes,
    smallest_cache_for,
    usage,
)

SMALL_MOE = Path(__file__).resolve().parents[1] / "export" / "assets" / "small-moe"


def test_lru_hit_rate_on_known_sequences():
    cyclic = np.array([[0], [1], [2]] * 10)
    assert lru_hit_rate(cyclic, 2) == 0.0  # LRU's worst case: a cycle one longer than the cache
    assert lru_hit_rate(cyclic, 3) == pytest.approx(27 / 30)
    # the oracle (evict least used in the next m tokens) does better than LRU on the same cycle
    assert segment_cache_hit_rate(cyclic, 2, m=4) > 0.3


def test_segment_routing_is_perfect_when_routing_is_constant_per_segment():
    route = np.array([[0, 1]] * 8 + [[2, 3]] * 8)
    f1, size = segment_routing_best_f1(route, 4, m=8)
    assert f1 == 1.0 and size == 1.0


def test_usage_and_capacity_recommendation():
    routes = [np.array([[0, 1]] * 50), np.array([[2, 3], [2, 1]] * 25)]
    u = usage(routes, 4)
    assert np.allclose(u.sum(axis=1), 1) and u[0, 0] == 0.5
    cap, rate = recommend_capacity(routes, 4, target=0.8)
    assert cap == 3 and rate >= 0.8  # layer 1 alternates 3 experts: an LRU of 2 hits only half


def _pieces(layer, e, planes=1, base=10_000, ref=3_000):
    return [(f"{layer}.{e}.{m}.{p}", slot_bytes(base if p == 0 else ref), p > 0) for p in range(planes)
            for m in ("ffn_gate", "ffn_up", "ffn_down")]


def test_runtime_model_counts_pieces_in_bytes_across_layers():
    # two layers, one expert each per token, alternating experts 0/1: 4 experts of 3 pieces of 3 slots (12 KiB)
    routes = [np.array([[0], [1]] * 20), np.array([[1], [0]] * 20)]
    reqs = decode_requests(routes, [0, 2], _pieces)
    assert len(reqs) == 80 and reqs[0][0][0] == "0.0.ffn_gate.0" and reqs[1][0][0] == "2.1.ffn_gate.0"
    piece = slot_bytes(10_000)
    assert runtime_lru_hit_rate(reqs, 12 * piece) == pytest.approx(1 - 12 / 240)  # all 4 experts fit: cold misses
    assert runtime_lru_hit_rate(reqs, 11 * piece) == 0.0  # a cycle of 4 experts in a cache of 3.67: LRU never hits
    cache, rate = smallest_cache_for(reqs, 0.8, 3 * piece, 12 * piece)
    assert cache == 11 * piece + 4096 or cache == 12 * piece  # the first size holding the whole cycle
    assert rate >= 0.8
    with pytest.raises(ValueError, match="exceed the cache"):
        runtime_lru_hit_rate(reqs, 2 * piece)


def test_runtime_model_evicts_refinement_planes_before_base_planes():
    # experts with 2 planes: a cache too small for 2 whole experts keeps both base planes, drops refinement planes
    routes = [np.array([[0], [1]] * 10)]
    reqs = decode_requests(routes, [0], lambda layer, e: _pieces(layer, e, planes=2))
    b, r = slot_bytes(10_000), slot_bytes(3_000)
    rate = runtime_lru_hit_rate(reqs, 6 * b + 3 * r)  # both bases + one expert's refinement planes
    # from the third request on: base planes hit (3 of 6 pieces), refinement planes miss (evicted by the other's)
    assert rate == pytest.approx((18 * 3) / (20 * 6))


@pytest.fixture(scope="module")
def small_f16(tmp_path_factory):
    if not (SMALL_MOE / "model.safetensors").exists():
        pytest.skip("the trained small model is not shipped in this checkout")
    importlib.import_module("edgemoe_export")
    importlib.import_module("edgemoe._native")
    from edgemoe_export import export

    return export(SMALL_MOE, tmp_path_factory.mktemp("analyze") / "small16.emoe", bits=16, show_progress=False)


def test_analyze_prediction_matches_the_runtime_hit_rate_at_the_recommended_budget(small_f16, tmp_path):
    """The predicted hit rate at the recommended budget is within 10 points of what the runtime measures there,
    decoding the same tokens one at a time (on-demand LRU, as the prediction models)."""
    import edgemoe

    n, max_ctx = 400, 512
    text = tmp_path / "heldout.txt"
    text.write_text((SMALL_MOE / "heldout" / "shakespeare.txt").read_text(encoding="utf-8")[:8000], encoding="utf-8")
    png = tmp_path / "routing.png"
    p = subprocess.run([*PYTHON, "-m", "edgemoe.cli", "analyze", str(small_f16), "--text", str(text),
                        "--max-tokens", str(n), "--ctx", str(n), "--max-ctx", str(max_ctx), "--heatmap", str(png),
                        "--json"], capture_output=True, text=True, timeout=600, check=False,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"sch_rho2", "srp_f1", "lru_hit_rate", "entropy_bits"} <= set(report["layers"][0])
    rec = report["recommendation"]
    assert rec["expected_hit_rate"] >= 0.8
    parts = rec["budget_parts"]
    assert rec["memory_budget_bytes"] == parts["dense"] + parts["kv_cache"] + parts["scratch"] + parts["expert_cache"]
    with edgemoe.load(small_f16, memory_budget=rec["memory_budget_bytes"], mode="ondemand", max_ctx=max_ctx) as m:
        st = m.stats
        assert st["budget_parts"]["expert_cache"] == parts["expert_cache"]  # the budget splits as predicted
        ids = m.tokenizer.encode(text.read_text(encoding="utf-8"))[:n]
        m._engine.prefill(ids[:1])
        for t in ids[1:]:
            m._engine.decode(t)
        measured = m.stats["cache_hit_rate"]
    print(f"analyze predicted {rec['expected_hit_rate']:.1%}, the runtime measured {measured:.1%} at "
          f"{rec['memory_budget_bytes']} bytes")
    assert abs(rec["expected_hit_rate"] - measured) <= 0.10
    assert measured < 0.99  # the recommended budget is tight: a cache holding everything would say nothing


def test_analyze_runs_on_mwq_experts_and_routes_like_the_model(tiny_dir, tmp_path):
    """MWQ containers: the routing pass reads the experts' planes at the model's precision (it once failed with 'no
    plane reader'), and the routes it records are the ones the served model takes (same top-k per token)."""
    from edgemoe_export import export

    import edgemoe
    from edgemoe.cli_tools import collect_routes

    path = export(tiny_dir("olmoe"), tmp_path / "mwq.emoe", bits=4, nesting="msb", show_progress=False)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    p = subprocess.run([*PYTHON, "-m", "edgemoe.cli", "analyze", str(path), "--text", str(text),
                        "--max-tokens", "64", "--max-ctx", "128", "--json"],
                       capture_output=True, text=True, timeout=300, check=False,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["recommendation"]["memory_budget_bytes"] > 0
    with edgemoe.load(path, engine="numpy") as m:
        ids = list(range(1, 33))
        routes = collect_routes(m, ids, ctx=32)
        seen: dict[int, np.ndarray] = {}
        m._engine.logits(ids, on_route=lambda layer, e, w: seen.setdefault(layer, e))
    assert len(routes) == m.spec.n_layers
    for layer, e in seen.items():
        np.testing.assert_array_equal(np.sort(routes[layer], axis=1), np.sort(e, axis=1))
