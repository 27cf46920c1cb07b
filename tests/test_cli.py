"""The CLI as a user drives it: subprocesses, exit codes, messages (never a traceback)."""

import json
import shutil
import subprocess
import sys

import pytest


def edgemoe(tmp_path, *args, input=None):
    exe = shutil.which("edgemoe")
    cmd = [exe] if exe else [sys.executable, "-m", "edgemoe"]
    # cwd elsewhere than the repository, so the installed package is the one imported
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=tmp_path, input=input,
                          timeout=600)


def test_export_info_run_bench_analyze_on_a_tiny_model(tmp_path, tiny_dir):
    src = tiny_dir("qwen3moe")
    out = tmp_path / "m.emoe"
    r = edgemoe(tmp_path, "export", src, "-o", out, "--bits", "16", "-q", "--gguf", tmp_path / "m.gguf",
                "--gguf-type", "F32")
    assert r.returncode == 0, r.stderr
    assert out.exists() and (tmp_path / "m.gguf").exists()
    r = edgemoe(tmp_path, "info", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["arch"]["family"] == "qwen3moe"
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
    assert 0 < rep["recommendation"]["lru_experts_per_layer"] <= 6


def test_bench_side_by_side_with_llama_cpp(tmp_path, tiny_dir):
    pytest.importorskip("llama_cpp")
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

    with em.load(tiny_emoe("olmoe", 32), max_ctx=16) as m:
        with pytest.raises(EdgeMoEError, match="exceed the context"):
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
