"""`edgemoe bench --vs-onnx`: onnxruntime in the same invocation as edgemoe, on a tiny model.

- the CLI prints a row per engine and test and a numeric edgemoe / onnxruntime ratio (text and JSON);
- the runner's generation loop (present -> past, positions, attention mask) computes the same logits as one
  full-sequence run, so the tg figure times real KV-cache decoding of this model;
- bad input (missing file, an ONNX file of another model) ends with a message, not a traceback.
"""

from __future__ import annotations

import importlib
import json
import re

import numpy as np
import pytest
from test_cli import edgemoe

importlib.import_module("onnxruntime")
importlib.import_module("onnx")


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """(container, model.onnx) of the tiny Qwen3-MoE, both fp32, written by `edgemoe export ... --onnx DIR`."""
    d = tmp_path_factory.mktemp("bench_onnx")
    out = d / "m.emoe"
    r = edgemoe(d, "export", tiny_dir("qwen3moe"), "-o", out, "--bits", "32", "-q", "--onnx", d / "onnx")
    assert r.returncode == 0, r.stderr
    return out, d / "onnx" / "model.onnx"


def test_bench_prints_onnxruntime_column_and_ratio(exported, tmp_path):
    emoe, onnx_path = exported
    r = edgemoe(tmp_path, "bench", emoe, "-p", "16", "-n", "4", "-r", "2", "--threads", "1", "--vs-onnx", onnx_path)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| m.emoe |", "| onnx/model.onnx |"))]
    engines_tests = {(c[1].strip(), c[2].strip(), c[4].strip()) for c in (row.split("|") for row in rows)}
    assert engines_tests == {("m.emoe", "edgemoe", "pp16"), ("m.emoe", "edgemoe", "tg4"),  # each row: its file
                             ("onnx/model.onnx", "onnxruntime", "pp16"), ("onnx/model.onnx", "onnxruntime", "tg4")}
    assert all(c.split("|")[3].strip() == "1" for c in rows)  # same thread count for both engines
    for test in ("pp16", "tg4"):
        m = re.search(rf"^{test}: edgemoe / onnxruntime = ([0-9.]+)$", r.stdout, re.MULTILINE)
        assert m, r.stdout
        assert float(m.group(1)) > 0
    assert "Traceback" not in r.stderr

    r = edgemoe(tmp_path, "bench", emoe, "-p", "8", "-n", "2", "-r", "2", "--vs-onnx", onnx_path, "--json")
    assert r.returncode == 0, r.stderr
    res = {(x["engine"], x["test"]): x for x in json.loads(r.stdout)["results"]}
    assert set(res) == {("edgemoe", "pp8"), ("edgemoe", "tg2"), ("onnxruntime", "pp8"), ("onnxruntime", "tg2")}
    assert all(len(x["samples_ts"]) == 2 and x["avg_ts"] > 0 for x in res.values())


def test_onnx_runner_decodes_through_the_kv_cache(exported):
    """Prefill 6 ids, then 5 single-token steps feeding `present` back as `past`: each step's logits equal the
    full-sequence run's row for that position (fp32 both ways: only summation order differs, measured ~1e-6)."""
    from edgemoe.bench_onnx import OnnxRunner

    runner = OnnxRunner(exported[1], n_threads=1)
    ids = [int(i) for i in np.random.default_rng(3).integers(3, 300, size=11)]
    full = runner.logits(ids)
    last, past = runner._run(ids[:6], 0, runner.empty_past)
    steps = [last]
    for pos in range(6, len(ids)):
        last, past = runner._run([ids[pos]], pos, past)
        steps.append(last)
    assert past["past_key_values.0.key"].shape[2] == len(ids)
    got = np.stack(steps)
    want = full[5:]
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-4
    assert runner.generate(ids[0], 3) > 0 and runner.prompt(ids) > 0


def test_bench_vs_onnx_bad_input(exported, tiny_dir, tmp_path):
    emoe, _ = exported
    r = edgemoe(tmp_path, "bench", emoe, "-p", "8", "-n", "2", "-r", "1", "--vs-onnx", tmp_path / "missing.onnx")
    assert r.returncode == 1 and "no such ONNX file" in r.stderr and "Traceback" not in r.stderr
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    r = edgemoe(tmp_path, "bench", emoe, "-p", "8", "-n", "2", "-r", "1", "--vs-onnx", garbage)
    assert r.returncode == 1 and "onnxruntime cannot load it" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "other"
    r = edgemoe(tmp_path, "export", tiny_dir("olmoe"), "-o", tmp_path / "o.emoe", "--bits", "32", "-q",
                "--onnx", other)
    assert r.returncode == 0, r.stderr
    r = edgemoe(tmp_path, "bench", emoe, "-p", "8", "-n", "2", "-r", "1", "--vs-onnx", other / "model.onnx")
    assert r.returncode == 1 and "not the same model" in r.stderr and "Traceback" not in r.stderr
