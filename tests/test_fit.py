"""`edgemoe fit`: the runtime's own minimum and cache size, expected reads from routing counts, measured bandwidths."""

import json
import subprocess

import numpy as np
import pytest
from subprocess_python import PYTHON

import edgemoe
from edgemoe import _native as N
from edgemoe.fit import fit, format_report, minimum_budget_bytes

CALIB = ("the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. "
         "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 ") * 80


@pytest.fixture(scope="module")
def mwq_model(tiny_dir, tmp_path_factory):
    """olmoe (6 experts, top-2) with MWQ-4 experts fitted on calibration text: the export records routing counts."""
    from edgemoe_export import export

    d = tmp_path_factory.mktemp("fit")
    (d / "calib.txt").write_text(CALIB)
    return export(tiny_dir("olmoe"), d / "olmoe_mwq4.emoe", bits=4, calib=d / "calib.txt", calib_tokens=1024,
                  show_progress=False)


def _stated_minimum(path, max_ctx):
    """The minimum the refusal carries as a number (BudgetError.plan), which its message states too."""
    with pytest.raises(N.BudgetError) as e:
        edgemoe.load(path, memory_budget=1, max_ctx=max_ctx)
    plan = e.value.plan
    assert "below the minimum" in str(e.value) and f"({plan['minimum_bytes']} bytes)" in str(e.value)
    assert plan["minimum_bytes"] == plan["dense_bytes"] + plan["kv_bytes"] + plan["scratch_bytes"] + \
        plan["min_cache_bytes"]
    return plan["minimum_bytes"]


def test_below_the_minimum_it_does_not_run_and_states_the_runtimes_minimum(mwq_model):
    minimum = _stated_minimum(mwq_model, 64)
    assert minimum and minimum == minimum_budget_bytes(mwq_model, 64)
    r = fit(mwq_model, minimum - 1, max_ctx=64, measure=False)
    assert r["runs"] is False and r["minimum_bytes"] == minimum and "below the minimum" in r["message"]
    assert fit(mwq_model, minimum, max_ctx=64, measure=False)["runs"] is True


def test_the_cache_it_reports_is_the_one_the_runtime_gets(mwq_model):
    budget = minimum_budget_bytes(mwq_model, 64) + 40_000
    r = fit(mwq_model, budget, max_ctx=64, measure=False)
    with edgemoe.load(mwq_model, memory_budget=budget, max_ctx=64) as m:
        parts = m.stats["budget_parts"]
    assert r["runs"] and r["expert_cache_bytes"] == parts["expert_cache"]
    assert (r["dense_bytes"], r["kv_bytes"], r["scratch_bytes"]) == (parts["dense"], parts["kv_cache"],
                                                                    parts["scratch"])
    # the budget is the C core's; the process's total adds this Python process (interpreter, NumPy, the library)
    from edgemoe.procfs import rss_bytes

    if rss_bytes() is not None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # RSS may shrink after fit measured it
        assert 0 < r["process_overhead_bytes"] <= peak
        assert r["process_total_bytes"] == budget + r["process_overhead_bytes"]
        assert "process total: about" in format_report(r)


def test_routing_counts_from_calibration_drive_the_expected_reads(mwq_model):
    from edgemoe.container import open_container

    c = open_container(mwq_model, verify=False)
    routing = c.metadata["export_summary"]["routing"]
    spec = c.spec
    c.close()
    for row in routing["expert_tokens"]:  # every token routes to top_k experts in every MoE layer
        assert sum(row) == routing["calib_tokens"] * spec.top_k
    budget = minimum_budget_bytes(mwq_model, 64) + 30_000
    r = fit(mwq_model, budget, max_ctx=64, measure=False)
    assert r["routing"].startswith("calibration counts")
    assert 0 < r["bytes_read_per_token"] < r["expert_bytes_per_token"]
    # all experts fit: nothing is read once the cache is warm
    big = fit(mwq_model, budget + 10 * r["expert_bytes_total"], max_ctx=64, measure=False)
    assert big["bytes_read_per_token"] == 0 and big["expected_hit_rate"] == 1.0


def test_without_routing_counts_uniform_routing_is_assumed_and_said(tiny_emoe):
    path = tiny_emoe("qwen3moe", 32)  # a float export: no calibration, no routing counts
    minimum = minimum_budget_bytes(path, 64)
    r = fit(path, minimum + 50_000, max_ctx=64, measure=False)
    assert "uniform" in r["routing"]
    spec = edgemoe.load(path).spec
    moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.n_layers))
    per_expert = r["expert_bytes_per_token"] / (moe_layers * spec.top_k)
    # equal experts, uniform routing: every cached expert saves the same share of the reads
    n_cached = r["experts_cached_bytes"] / (r["expert_bytes_total"] / (moe_layers * spec.n_experts))
    expected = r["expert_bytes_per_token"] * (1 - n_cached / (moe_layers * spec.n_experts))
    assert r["bytes_read_per_token"] == pytest.approx(expected, rel=1e-6)
    assert per_expert > 0


def test_prediction_is_close_to_what_the_runtime_reads(mwq_model):
    budget = minimum_budget_bytes(mwq_model, 256) + 30_000
    r = fit(mwq_model, budget, max_ctx=256, measure=False)
    with edgemoe.load(mwq_model, memory_budget=budget, max_ctx=256) as m:
        m.generate(CALIB[:150], max_new_tokens=80, stop_at_eos=False)  # text like the calibration text
        measured = m.stats["bytes_read_per_token"]
    # a static hottest-first cache vs the runtime's dynamic one with prefetch (which also reads some experts it
    # predicted wrongly): the same order of magnitude, not the same figure
    assert 0.4 * measured <= r["bytes_read_per_token"] <= 2.5 * measured, (r["bytes_read_per_token"], measured)


def test_bandwidths_are_measured_quickly_and_give_tokens_per_second(mwq_model):
    budget = minimum_budget_bytes(mwq_model, 64) + 30_000
    r = fit(mwq_model, budget, max_ctx=64)
    st, mem = r["storage_read"], r["memory_read"]
    assert st["bytes"] > 0 and st["bytes_per_s"] > 0 and st["seconds"] < 1.0
    assert mem["bytes_per_s"] > 1e8  # any machine streams memory faster than 100 MB/s
    tps = r["tokens_per_s"]
    assert 0 < tps["no_overlap"] <= tps["full_overlap"]
    t = r["seconds_per_token"]
    assert tps["no_overlap"] == pytest.approx(1 / (t["memory"] + t["storage"]))


def test_cli_fit_text_json_and_refusal(mwq_model, tmp_path):
    def cli(*args):
        return subprocess.run([*PYTHON, "-m", "edgemoe", "fit", str(mwq_model), *args], check=False,
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)

    from edgemoe.cli_options import default_threads

    minimum = minimum_budget_bytes(mwq_model, 64, threads=default_threads())  # fit's default threads, as run's
    r = cli("--budget", str(minimum + 30_000), "--max-ctx", "64")
    assert r.returncode == 0, r.stderr
    assert "runs: minimum" in r.stdout and "storage read" in r.stdout and "tok/s" in r.stdout
    r = cli("--budget", str(minimum + 30_000), "--max-ctx", "64", "--json")
    rep = json.loads(r.stdout)
    assert rep["runs"] and rep["minimum_bytes"] == minimum and rep["tokens_per_s"]["no_overlap"] > 0
    r = cli("--budget", "1KB", "--max-ctx", "64")
    assert r.returncode == 1 and "does NOT run" in r.stdout and f"({minimum} bytes)" in r.stdout
    r = cli("--budget", "3XB")
    assert r.returncode == 1 and "cannot read size '3XB'" in r.stderr and "Traceback" not in r.stderr
    assert np.isfinite(minimum)
