"""The one export pipeline: default calibration, --calib none, merging any source (GGUF too), the predictor in the
file and used by the runtime, and logs kept off stdout."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
from contextlib import closing

import numpy as np
import pytest
from subprocess_python import PYTHON

import edgemoe
from edgemoe.container import open_container
from edgemoe.errors import EdgeMoEError

TEXT = ("the quick brown fox jumps over the lazy dog, to be or not to be, that is the question. " * 300)


def edgemoe_cli(cwd, *args):
    exe = shutil.which("edgemoe")
    cmd = [exe] if exe else [*PYTHON, "-m", "edgemoe"]
    return subprocess.run(cmd + [str(a) for a in args], check=False, capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture
def bare_dir(tiny_dir, tmp_path):
    """A tiny OLMoE checkpoint directory as users have them: config, safetensors, tokenizer, no calib.txt."""
    src = tmp_path / "hf-model"
    shutil.copytree(tiny_dir("olmoe"), src)
    (src / "calib.txt").unlink(missing_ok=True)
    return src


def test_readme_export_line_works_without_calibration_text(bare_dir, tmp_path):
    """`edgemoe export path/to/hf-model -o model.emoe --bits 4`, as the README writes it."""
    from edgemoe_export.pipeline import DEFAULT_CALIB

    out = tmp_path / "model.emoe"
    r = edgemoe_cli(tmp_path, "export", bare_dir, "-o", out, "--bits", "4")
    assert r.returncode == 0, r.stderr
    # stdout is the result (the wrote line and the summary table); progress and logs went to stderr
    assert r.stdout.startswith("wrote ") and "Traceback" not in r.stderr
    assert f"calibration: {DEFAULT_CALIB.name}" in r.stdout and "shipped" in r.stdout
    assert "layer 0:" not in r.stdout and "MWQ:" in r.stderr
    c = open_container(out)
    md = c.metadata
    assert md["calibration"]["source"] == "default" and md["calibration"]["tokens"] > 0
    assert md["mwq_fit"] == "calibration-weighted"
    assert any(t.quant.get("weighted") for t in c.tensors.values() if t.dtype == "mwq")
    # the predictor is fitted on the same calibration pass and stored for every MoE layer
    spec = c.spec
    for layer in range(spec.n_layers):
        t = c.tensors[f"blk.{layer}.ffn_gate_inp_pre.weight"]
        assert t.dtype == "f32" and t.shape == (spec.n_experts, spec.hidden) and t.kind == "dense"
    assert md["predictor"]["layers"] == list(range(spec.n_layers))
    c.close()
    r = edgemoe_cli(tmp_path, "info", out)
    assert r.returncode == 0 and "predictor" in r.stdout and "calibration: calib-default.txt" in r.stdout


def test_calib_none_is_weight_only_and_refuses_what_needs_text(bare_dir, tmp_path):
    from edgemoe_export import export

    out = export(bare_dir, tmp_path / "w.emoe", bits=4, calib="none", show_progress=False)
    c = open_container(out)
    md = c.metadata
    assert md["calibration"]["source"] == "none" and md["mwq_fit"].startswith("weight-only")
    planes = [t for t in c.tensors.values() if t.dtype == "mwq"]
    assert planes and not any(t.quant["weighted"] for t in planes)
    assert not any(n.endswith("ffn_gate_inp_pre.weight") for n in c.tensors)  # no calibration, no predictor
    assert "export_summary" in md and md["export_summary"]["calibration"]["source"] == "none"
    c.close()
    # weight-only fitting on the same weights equals the MWQ fit with no Gram, matrix by matrix
    from edgemoe_export.checkpoint import open_checkpoint
    from edgemoe_export.mwq import quantize_matrix

    ck = open_checkpoint(bare_dir)
    name, W = next(iter(ck.layer_experts(0)))
    qm = quantize_matrix(W, None, 2, 4, md["group_size"], "mwq")
    with closing(open_container(out)) as c2:
        assert all(np.array_equal(a, b) for a, b in zip(c2.planes(name), qm.planes))
    with edgemoe.load(out, engine="numpy") as m:
        assert np.isfinite(m.logits([5, 9, 17, 33])).all()
    r = edgemoe_cli(tmp_path, "info", out)  # `info` says how the planes were fitted
    assert r.returncode == 0 and "calibration: none (weight-only MWQ fitting)" in r.stdout
    for kwargs in ({"merge_ratio": 0.5}, {"predictor": True}):
        with pytest.raises(EdgeMoEError, match="--calib none: .* needs calibration text"):
            export(bare_dir, tmp_path / "x.emoe", bits=16, calib="none", show_progress=False, **kwargs)
    assert not (tmp_path / "x.emoe").exists()


def test_calib_file_missing_is_refused_by_name(bare_dir, tmp_path):
    r = edgemoe_cli(tmp_path, "export", bare_dir, "-o", tmp_path / "m.emoe", "--bits", "4", "--calib",
                    tmp_path / "nope.txt")
    assert r.returncode != 0 and "nope.txt: no such file" in r.stderr and "Traceback" not in r.stderr


def test_merge_from_a_gguf_source_equals_the_merge_from_its_directory(tmp_path):
    """`--merge-ratio` runs through the same pipeline for a GGUF file: the same map and the same model."""
    importlib.import_module("gguf")
    import warnings

    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf
    from edgemoe_export.merge import DEFAULT_METHOD
    from tiny_models_gguf import build_gguf_variant

    src = build_gguf_variant("olmoe_mha", tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gguf_path = export_gguf(src, tmp_path / "m.gguf", "F32", show_progress=False)
    calib = tmp_path / "text.txt"
    calib.write_text(TEXT)
    opts = {"bits": 32, "merge_ratio": 0.5, "calib": calib, "calib_tokens": 1024, "seq_len": 64, "show_progress": False}
    from_dir = export(src, tmp_path / "dir.emoe", **opts)
    from_gguf = export(gguf_path, tmp_path / "gguf.emoe", **opts)
    ids = np.random.default_rng(0).integers(3, 300, 24)
    with edgemoe.load(from_dir, engine="numpy") as a, edgemoe.load(from_gguf, engine="numpy") as b:
        assert a.spec.expert_map == b.spec.expert_map
        assert sum(a.spec.stored_experts(i) for i in range(a.spec.n_layers)) < a.spec.n_experts * a.spec.n_layers
        assert b.container.metadata["merge"]["method"] == DEFAULT_METHOD == "reap"  # the best measured (BENCHMARKS)
        assert any(n.endswith("ffn_gate_inp_pre.weight") for n in b.container.tensors)  # predictor: default on
        la, lb = a.logits(ids), b.logits(ids)
        assert np.abs(la - lb).max() <= 1e-4 * np.abs(la).max()


def _olmoe_16_experts(out):
    """OLMoE with 16 experts, top-2: a prediction of 3 experts is far from a guess (the tiny models have 4-6)."""
    import torch
    import transformers as tf
    from tiny_models import _write_tokenizer

    cfg = tf.OlmoeConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=16, num_experts_per_tok=2,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)  # OLMoE's default ids (50279 ...) are outside this 320-token vocabulary
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    _write_tokenizer(out, 320)
    return out


def test_the_runtime_prefetches_with_the_exported_predictor(tmp_path):
    """The C streaming engine predicts with the file's fitted predictor: replacing it by the negated router (the
    worst predictor there is) in an otherwise identical file collapses the prefetch recall it reports."""
    from edgemoe_export import export
    from edgemoe_export.predictor import add_predictors, predictor_name

    bare_dir = _olmoe_16_experts(tmp_path / "e16")
    calib = bare_dir / "calib.txt"
    calib.write_text(TEXT)  # the checkpoint's own calib.txt is preferred to the shipped default
    out = export(bare_dir, tmp_path / "p.emoe", bits=16, predictor=True, calib_tokens=1024, show_progress=False)
    with closing(open_container(out)) as c:
        assert c.metadata["calibration"]["source"] == "checkpoint"
        spec = c.spec
        fitted = {layer: c.array(predictor_name(layer)).reshape(spec.n_experts, spec.hidden).copy()
                  for layer in range(spec.n_layers)}
        routers = {layer: c.array(f"blk.{layer}.ffn_gate_inp.weight").astype(np.float32)
                   .reshape(spec.n_experts, spec.hidden) for layer in range(spec.n_layers)}
    assert all(not np.allclose(fitted[i], routers[i]) for i in fitted)  # a fit, not a copy of the router
    bad = add_predictors(out, tmp_path / "neg.emoe", {i: -r for i, r in routers.items()})

    importlib.import_module("edgemoe._native")

    def recall(path):
        with edgemoe.load(path, engine="c", memory_budget="256MB", prefetch=1) as m:
            m.generate("the quick brown fox", max_new_tokens=24, stop_at_eos=False)
            return m.stats["prefetch_recall"]

    good, worst = recall(out), recall(bad)
    assert good > 0.6 and worst < good - 0.3, (good, worst)


def test_bench_tools_still_write_merged_layers(tiny_dir, tmp_path):
    """bench/merge_study.py's path: calibrated layers merged by `merge_stage` and written by the pipeline's
    writer, with MWQ planes from `mwq_encoder` (the pipeline's quantizer)."""
    from edgemoe_export.calibrate import calibrate
    from edgemoe_export.checkpoint import open_checkpoint
    from edgemoe_export.merge_stage import merge_stage, mwq_encoder, write_merged_container

    ck = open_checkpoint(tiny_dir("qwen3moe"))
    seqs = [np.random.default_rng(i).integers(3, 300, 32) for i in range(4)]
    layers = [merge_stage(cal, ck.spec, 2, "mcsmoe") for cal in calibrate(ck, seqs, group_size=8,
                                                                           show_progress=False) if cal.freq is not None]
    out = write_merged_container(ck, tmp_path / "b.emoe", layers, {"merge": {"method": "mcsmoe"}}, bits=4,
                                 expert_encoder=mwq_encoder(4, 2, 8))
    with edgemoe.load(out, engine="numpy") as m:
        assert all(len(m.spec.layer_expert_map(i)) == m.spec.n_experts for i in range(m.spec.n_layers))
        assert np.isfinite(m.logits([5, 9, 17])).all()
    info = json.loads(edgemoe_cli(tmp_path, "info", out, "--json").stdout)
    assert info["metadata"]["export_summary"]["merge_map"]


def test_nncf_logs_stay_off_stdout(tiny_dir, tmp_path):
    """`--onnx-weights int8` runs NNCF, whose INFO lines and bitwidth table went to stdout, into the summary."""
    importlib.import_module("nncf")
    importlib.import_module("onnx")
    r = edgemoe_cli(tmp_path, "export", tiny_dir("qwen3moe"), "-o", tmp_path / "m.emoe", "--bits", "16",
                    "--onnx", tmp_path / "onnx", "--onnx-weights", "int8")
    assert r.returncode == 0, r.stderr
    assert "INFO:nncf" in r.stderr  # NNCF did report (on stderr)
    assert "INFO:nncf" not in r.stdout and "bitwidth" not in r.stdout, r.stdout
    assert "time per stage" in r.stdout and "wrote" in r.stdout


def test_experts_are_held_as_float16_only_when_exact():
    from edgemoe_export.calibrate import compact

    exact = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float16).astype(np.float32)
    assert compact(exact).dtype == np.float16 and np.array_equal(compact(exact).astype(np.float32), exact)
    inexact = exact + np.float32(1e-6)  # bf16 or f32 checkpoints: kept as they are
    assert compact(inexact).dtype == np.float32 and compact(inexact) is inexact


def test_dense_q8_0_by_row_blocks_is_the_whole_matrix_quantization(monkeypatch):
    """The dense encoder quantizes big matrices in row blocks to bound memory: the bytes must not change."""
    from edgemoe_export import pipeline

    from edgemoe.quant import quantize_q8_0

    a = np.random.default_rng(0).standard_normal((1001, 256)).astype(np.float32)
    monkeypatch.setattr(pipeline, "Q8_0_CHUNK", 256 * 7)  # 143 row blocks, the last one short
    assert pipeline._q8_0_by_rows(a).tobytes() == quantize_q8_0(a).tobytes()


def test_experts_fitted_during_calibration_equal_the_ones_fitted_after(bare_dir, tmp_path, monkeypatch):
    """The default MWQ export fits each expert while the rest of its layer is calibrated (pipeline.FitOverlap, one
    BLAS thread, two fit workers); switched off, every expert is fitted after its layer: the same bytes."""
    from edgemoe_export import export, pipeline

    calib = tmp_path / "text.txt"
    calib.write_text(TEXT)
    opts = {"bits": 4, "calib": calib, "calib_tokens": 1024, "seq_len": 64, "show_progress": False}
    submitted = []
    real_submit = pipeline.FitOverlap.submit
    monkeypatch.setattr(pipeline.FitOverlap, "submit", lambda self, cal, e: (submitted.append(e),
                                                                            real_submit(self, cal, e)))
    overlapped = open_container(export(bare_dir, tmp_path / "overlap.emoe", **opts))
    assert submitted  # the overlap ran
    real_init = pipeline.FitOverlap.__init__

    def sequential(self, plan):
        real_init(self, plan)
        self.active = False

    monkeypatch.setattr(pipeline.FitOverlap, "__init__", sequential)
    after = open_container(export(bare_dir, tmp_path / "after.emoe", **opts))
    experts = [n for n, t in after.tensors.items() if t.kind == "expert"]
    assert experts and all(after.tensors[n].dtype == "mwq" for n in experts)
    assert set(experts) == {n for n, t in overlapped.tensors.items() if t.kind == "expert"}
    for n in experts:
        assert all(np.array_equal(a, b) for a, b in zip(after.planes(n), overlapped.planes(n))), n
        assert after.tensors[n].quant == overlapped.tensors[n].quant


def test_stacked_experts_are_read_one_slice_at_a_time(tmp_path):
    """A layer's stacked experts ([E, 2F, H], transformers 5's fused layout) are read one expert's slice at a time
    (the whole tensor in float32 was 1.6 GB per layer at Qwen3-30B-A3B's shape): each slice is the same numbers."""
    import torch
    from edgemoe_export.safetensors_lazy import SafetensorsSet
    from safetensors.torch import save_file

    rng = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(5, 6, 8, generator=rng, dtype=torch.float32).to(torch.bfloat16),
         "b": torch.randn(5, 8, 3, generator=rng, dtype=torch.float32).to(torch.float16)}
    save_file(t, str(tmp_path / "model.safetensors"))
    ts = SafetensorsSet(tmp_path)
    for name, ref in t.items():
        whole = ts.get(name)
        assert whole.shape == tuple(ref.shape)
        np.testing.assert_array_equal(whole, ref.float().numpy())
        for e in range(ref.shape[0]):
            np.testing.assert_array_equal(ts.get(name, e), whole[e])
    with pytest.raises(IndexError, match="5 slices"):
        ts.get("a", 5)
