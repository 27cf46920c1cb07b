"""The CLI as a user drives it: subprocesses, exit codes, messages (never a traceback)."""

import importlib
import json
import re
import shutil
import subprocess

import pytest
from subprocess_python import PYTHON


def edgemoe(tmp_path, *args, input=None):
    exe = shutil.which("edgemoe")
    cmd = [exe] if exe else [*PYTHON, "-m", "edgemoe"]
    # cwd elsewhere than the repository, so the installed package is the one imported
    return subprocess.run(cmd + [str(a) for a in args], check=False, capture_output=True, text=True, cwd=tmp_path,
                          input=input, timeout=600)


def test_export_info_run_bench_analyze_on_a_tiny_model(tmp_path, tiny_dir):
    src = tiny_dir("qwen3moe")
    out = tmp_path / "m.emoe"
    r = edgemoe(tmp_path, "export", src, "-o", out, "--bits", "16", "-q", "--gguf", tmp_path / "m.gguf",
                "--gguf-type", "F32")
    assert r.returncode == 0, r.stderr
    assert out.exists() and (tmp_path / "m.gguf").exists()
    assert "time per stage: read" in r.stdout and "bits/weight" in r.stdout  # the closing summary table
    r = edgemoe(tmp_path, "info", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["arch"]["family"] == "qwen3moe"
    summary = json.loads(r.stdout)["metadata"]["export_summary"]
    assert summary["parts"]["experts"]["bits_per_weight"] == 16.0  # --bits 16: f16 experts, no scales
    assert summary["stored_bytes"] == sum(json.loads(r.stdout)["bytes"][k] for k in ("dense", "expert"))
    r = edgemoe(tmp_path, "info", out)  # human-readable: the summary as a table, not a JSON blob in the metadata line
    assert r.returncode == 0 and "export summary:" in r.stdout and "time per stage" in r.stdout
    assert "export_summary" not in r.stdout
    r = edgemoe(tmp_path, "run", out, "-p", "the quick brown", "-n", "8", "--json")
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)
    assert run["stats"]["decode_tokens"] >= 1 and isinstance(run["text"], str)
    r = edgemoe(tmp_path, "bench", out, "-p", "16", "-n", "4", "-r", "2", "--json")
    assert r.returncode == 0, r.stderr
    tests = {x["test"]: x for x in json.loads(r.stdout)["results"]}
    assert set(tests) == {"pp16", "tg4"} and all(len(x["samples_ts"]) == 2 and x["avg_ts"] > 0 for x in tests.values())
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be that is the question " * 40)
    r = edgemoe(tmp_path, "analyze", out, "--text", text, "--max-tokens", "128", "--json",
                "--heatmap", tmp_path / "h.png")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(rep["layers"]) == 2
    rec = rep["recommendation"]  # (its schema is analyze's: the cache as experts per layer, or as bytes)
    assert rec["memory_budget_bytes"] > 0 and 0 < rec["expected_hit_rate"] <= 1


def test_bench_side_by_side_with_llama_cpp(tmp_path, tiny_dir):
    importlib.import_module("llama_cpp")
    out = tmp_path / "m.emoe"
    assert edgemoe(tmp_path, "export", tiny_dir("qwen3moe"), "-o", out, "--bits", "32", "-q", "--gguf",
                   tmp_path / "m.gguf", "--gguf-type", "F32").returncode == 0
    r = edgemoe(tmp_path, "bench", out, "-p", "16", "-n", "4", "-r", "2", "--vs-llama-cpp", tmp_path / "m.gguf")
    assert r.returncode == 0, r.stderr
    assert "edgemoe / llama.cpp" in r.stdout and "llama.cpp" in r.stdout


@pytest.mark.parametrize("args, code, message", [
    (["run", "missing.emoe", "-p", "x"], 1, "no such file"),
    (["info", "m.emoe", "--no-such-flag"], 2, "unrecognized arguments"),
    (["bench"], 2, "required"),
])
def test_bad_invocations_give_a_message_and_status(tmp_path, args, code, message):
    r = edgemoe(tmp_path, *args)
    assert r.returncode == code and message in r.stderr and "Traceback" not in r.stderr


def test_prompt_longer_than_the_context_is_refused(tmp_path, tiny_emoe):
    import edgemoe as em
    from edgemoe.errors import EdgeMoEError

    with em.load(tiny_emoe("olmoe", 32), max_ctx=16) as m, pytest.raises(EdgeMoEError, match="exceed the context"):
        m.generate(list(range(3, 40)), max_new_tokens=2)


def test_streaming_yields_the_same_text_as_non_streaming(tiny_emoe):
    import edgemoe as em

    with em.load(tiny_emoe("mixtral", 32)) as m:
        full = m.generate("the quick brown fox", max_new_tokens=12, stop_at_eos=False)
        pieces = list(m.generate("the quick brown fox", max_new_tokens=12, stream=True, stop_at_eos=False))
        assert "".join(pieces) == full and len(pieces) > 1


def test_export_with_merge_ratio_runs(tmp_path, tiny_dir):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, to be or not to be. " * 200)
    out = tmp_path / "merged.emoe"
    r = edgemoe(tmp_path, "export", tiny_dir("mixtral"), "-o", out, "--merge-ratio", "0.5", "--calib", text,
                "--calib-tokens", "1024", "-q")
    assert r.returncode == 0, r.stderr
    info = json.loads(edgemoe(tmp_path, "info", out, "--json").stdout)
    emap = info["arch"]["expert_map"]
    assert any(layer and max(layer) + 1 < 4 for layer in emap)  # fewer stored experts than routed ones
    r = edgemoe(tmp_path, "run", out, "-p", "the quick", "-n", "4")
    assert r.returncode == 0, r.stderr
    export_out = edgemoe(tmp_path, "export", tiny_dir("mixtral"), "-o", tmp_path / "m2.emoe", "--experts-per-layer",
                         "2", "--calib", text, "--calib-tokens", "1024", "-q").stdout
    assert "merge map" in export_out and "layer 0: 4 -> 2:" in export_out  # the groups of routed experts


def test_export_summary_of_an_mwq_export(tmp_path, tiny_dir):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, to be or not to be. " * 200)
    out = tmp_path / "q4.emoe"
    r = edgemoe(tmp_path, "export", tiny_dir("olmoe"), "-o", out, "--bits", "4", "--calib", text,
                "--calib-tokens", "1024", "-q")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.strip()}
    experts = rows["experts"]
    bpw = float(experts[-2])  # 2-bit base + 2 binary planes, each with per-group scales: above 4 bits
    assert bpw > 4.0 and experts[-1].startswith("mwq2+2")
    assert float(rows["attention"][-2]) == 8.5  # Q8_0: 32 int8 + one f16 scale per block
    assert "calibrate" in r.stdout and "quantize" in r.stdout
    info = json.loads(edgemoe(tmp_path, "info", out, "--json").stdout)
    assert bpw == pytest.approx(info["mwq_planes"][-1]["cumulative_bits_per_weight"], rel=0.01)  # as info counts
    summary = info["metadata"]["export_summary"]
    assert set(summary["stages_s"]) >= {"read", "calibrate", "quantize", "write"}
    assert sum(summary["stages_s"].values()) <= summary["total_s"] * 1.01  # exclusive times: no double counting
    assert summary["parts"]["experts"]["source_bytes"] > summary["parts"]["experts"]["stored_bytes"]


def test_run_sampling_flags_seed_stop_and_mode(tmp_path, tiny_emoe):
    model = tiny_emoe("olmoe", 32)

    def run(*args):
        r = edgemoe(tmp_path, "run", model, "-p", "the quick brown", "-n", "16", "--json", *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    a = run("--temperature", "1.0", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01", "--seed", "3")
    b = run("--temperature", "1.0", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01", "--seed", "3")
    c = run("--temperature", "1.0", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01", "--seed", "4")
    greedy = run()
    assert a["text"] == b["text"] and len(a["text"]) > 0
    assert len({a["text"], c["text"], greedy["text"]}) > 1  # the seed and temperature change the text
    stop = greedy["text"][3:5]
    stopped = run("--stop", stop)
    assert stopped["text"] == greedy["text"][: greedy["text"].index(stop)]
    budgeted = run("--budget", "64MB", "--mode", "ondemand", "--max-ctx", "64")
    assert budgeted["text"] == greedy["text"] and budgeted["stats"]["mode"] == "ondemand"


def test_run_precision_reads_fewer_planes_as_the_api_does(tmp_path, tiny_emoe):
    """--precision K (run, chat, serve, bench, ppl): MWQ experts at K planes, the same text as load(precision=K)."""
    from edgemoe import load

    model = tiny_emoe("olmoe", 4)  # 2-bit base + 2 residual planes

    def run(*args):
        r = edgemoe(tmp_path, "run", model, "-p", "the quick brown", "-n", "12", "--json", *args)
        return r, (json.loads(r.stdout) if r.returncode == 0 else None)

    _, full = run()
    _, one = run("--precision", "1")
    _, budgeted = run("--precision", "1", "--budget", "64MB", "--max-ctx", "64")
    assert full["stats"]["expert_planes"] == 3 and one["stats"]["expert_planes"] == 1
    with load(model, precision=1) as m:
        assert one["text"] == m.generate("the quick brown", max_new_tokens=12)
    assert budgeted["text"] == one["text"]
    assert budgeted["stats"]["experts_at_planes"][0] > 0 and sum(budgeted["stats"]["experts_at_planes"][1:]) == 0
    bad, _ = run("--precision", "4")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("edgemoe: error:") and "stores 3 planes" in bad.stderr
    r = edgemoe(tmp_path, "run", tiny_emoe("olmoe", 32), "-p", "hi", "-n", "2", "--precision", "1")
    assert r.returncode == 1 and "needs MWQ experts" in r.stderr and "Traceback" not in r.stderr


def test_budget_without_max_ctx_leaves_the_experts_at_least_the_kv_caches_bytes(tmp_path, tiny_emoe):
    """With --budget and no --max-ctx the context is the largest whose KV cache leaves the expert cache at least as
    much (a 4096 context once took 268 of 630 MB and the hit rate fell from 63 % to 21 %); the API's error for a
    context that does not fit still names the largest that does."""
    from edgemoe.container import open_container
    from edgemoe.model import MIN_AUTO_CTX, budget_plan, context_for_budget, default_max_ctx

    model = tiny_emoe("olmoe", 32)
    c = open_container(model, verify=False)
    full = default_max_ctx(c.spec)
    c.close()
    plans = {n: budget_plan(model, n, 1, "exact", None, 1) for n in (full, full // 2, full // 4, MIN_AUTO_CTX)}
    assert plans[full]["kv_bytes"] > plans[full]["min_cache_bytes"]  # the tiny model's context outweighs its experts
    budget = plans[full]["minimum_bytes"] + 4096  # holds the full context, with almost no expert cache beside it

    def cache(n):
        p = plans[n]
        return budget - p["dense_bytes"] - p["kv_bytes"] - p["scratch_bytes"]

    want = next(n for n in (full, full // 2, full // 4, MIN_AUTO_CTX) if plans[n]["kv_bytes"] <= cache(n))
    assert MIN_AUTO_CTX <= want < full
    assert context_for_budget(model, budget) == want
    assert context_for_budget(model, budget, leave_experts=False) == full
    r = edgemoe(tmp_path, "run", model, "-p", "the quick brown", "-n", "2", "--budget", budget, "--threads", "1",
                "--json")
    assert r.returncode == 0, r.stderr
    assert f"context {want} tokens (of the model's {full})" in r.stderr and "leaving the expert cache" in r.stderr
    r = edgemoe(tmp_path, "run", model, "-p", "the quick brown", "-n", "2", "--budget", budget, "--threads", "1",
                "--max-ctx", str(full))  # asked for: kept, and it loads
    assert r.returncode == 0 and "tokens (of the model's" not in r.stderr


def test_gguf_of_a_pruning_merge_is_refused_before_any_work(tmp_path, tiny_dir):
    """REAP (the default merge) and prune drop experts, which no GGUF can express: `--gguf` with them is refused at
    once, naming the method that can, and nothing is written (it used to fail after writing the container)."""
    for method in ([], ["--merge-method", "prune"]):
        r = edgemoe(tmp_path, "export", tiny_dir("olmoe"), "-o", tmp_path / "m.emoe", "--merge-ratio", "0.5",
                    "--gguf", tmp_path / "m.gguf", *method)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "--merge-method mcsmoe" in r.stderr and r.stderr.strip().count("\n") == 0
        assert not list(tmp_path.glob("m.*"))


@pytest.mark.parametrize("command", ["export", "info", "run", "chat", "ppl", "bench", "analyze", "fit", "demo"])
def test_every_subcommand_explains_itself_with_examples(tmp_path, command):
    r = edgemoe(tmp_path, command, "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and f"edgemoe {command}" in r.stdout


def test_bad_invocations_of_a_user_never_show_a_traceback(tmp_path, tiny_emoe):
    model = tiny_emoe("olmoe", 32)
    cases = [
        (["run", model, "-p", "hi", "--budget", "3XB"], 1, "cannot read size '3XB'"),
        (["run", model, "-p", "one two three " * 20, "--max-ctx", "16"], 1, "; the context holds 16: pass --max-ctx"),
        (["run", model, "-p", "hi", "--mode", "fastest"], 2, "invalid choice: 'fastest'"),
        (["run", model], 2, "required: -p/--prompt"),
        (["fit", model], 2, "required: --budget"),
        (["chat", tmp_path / "nope.emoe"], 1, "no such file"),
        (["ppl", model, "--text", tmp_path / "nope.txt"], 1, "no such file"),
        ([], 2, "required: COMMAND"),
    ]
    for args, code, message in cases:
        r = edgemoe(tmp_path, *args)
        assert (r.returncode, message in r.stderr, "Traceback" in r.stderr) == (code, True, False), (args, r.stderr)


def test_demo_runs_under_a_budget_below_the_model_size(tmp_path):
    r = edgemoe(tmp_path, "demo", "-n", "8", "--workdir", tmp_path)
    assert r.returncode == 0, r.stderr
    m = re.search(r"budget \S+ \S+ = (\d+)% of the file", r.stdout)
    assert m and int(m.group(1)) < 100, r.stdout
    for stat in ("hit rate", "/token", "I/O stall", "prefetch recall", "peak RSS"):
        assert stat in r.stdout
    assert "evictions" in r.stdout and " 0 evictions" not in r.stdout  # it really streamed experts


def test_bench_vs_llama_cpp_bad_input(tmp_path, tiny_emoe):
    """A missing file, a file that is not GGUF (a container given by mistake) and a truncated GGUF end with a message
    naming the file, not llama-cpp-python's bare 'Failed to load model'."""
    model = tiny_emoe("qwen3moe", 32)
    bench = ("bench", model, "-p", "4", "-n", "2", "-r", "1", "--vs-llama-cpp")
    r = edgemoe(tmp_path, *bench, tmp_path / "missing.gguf")
    assert r.returncode == 1 and "no such GGUF file" in r.stderr and "Traceback" not in r.stderr
    r = edgemoe(tmp_path, *bench, model)
    assert r.returncode == 1 and "not a GGUF file" in r.stderr and "internal error" not in r.stderr
    importlib.import_module("llama_cpp")
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF" + b"\0" * 20)
    r = edgemoe(tmp_path, *bench, truncated)
    assert r.returncode == 1 and "llama.cpp could not load it" in r.stderr and "internal error" not in r.stderr
