"""Gemma-4 MoE (`gemma4_text`; `gemma4` with the text model under text_config): a tiny transformers 5 checkpoint ->
export -> edgemoe, against transformers and itself.

The tiny model (tiny_gemma4.py) makes every Gemma-4 option matter on a 24-token sequence; the feature test shows it:
dropping any one of them from the description moves the logits far from transformers'."""

import dataclasses
import importlib
import json

import numpy as np
import pytest
from conftest import hf_logits, rel_err
from family_exports import IDS, family_exports
from greedy_tokens import greedy_tokens

import edgemoe
from edgemoe.arch import model_tensors
from edgemoe.container import open_container
from edgemoe.errors import EdgeMoEError, FormatError, UnsupportedModelError
from edgemoe.reference import reference_logits

N = importlib.import_module("edgemoe._native")
importlib.import_module("edgemoe_export")


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """(bits) -> container; .dir is the HF checkpoint."""
    from tiny_gemma4 import build_tiny_gemma4

    return family_exports(tmp_path_factory, "gemma4", build_tiny_gemma4)


@pytest.fixture(scope="module")
def hf_ref(gemma4):
    return hf_logits(gemma4.dir, IDS)


def test_reader_describes_every_gemma4_option(gemma4):
    s = open_container(gemma4(32), verify=False).spec
    assert (s.family, s.n_experts, s.top_k, s.expert_ffn, s.dense_ffn, s.head_dim) == ("gemma4", 5, 3, 40, 48, 24)
    assert s.swa_layers == [0, 1, 3] and s.sliding_window == 5 and s.dense_layers == []
    assert (s.global_head_dim, s.global_kv_heads, s.global_rope_angles, s.global_rope_theta) == (32, 1, 4, 1e6)
    assert s.global_k_eq_v and s.v_norm and s.post_norms and s.dense_beside_moe and s.layer_scale
    assert s.qk_norm == "head" and s.attn_scale == 1.0 and s.embed_scale == 8.0 and s.logit_softcap == 30.0
    assert (s.router_fn, s.norm_topk, s.router_input, s.activation) == ("softmax", True, "residual_norm", "geglu_tanh")


@pytest.mark.parametrize("engine", ["numpy", "c"])
def test_gemma4_fp32_logits_match_transformers(gemma4, hf_ref, engine):
    with edgemoe.load(gemma4(32), engine=engine, threads=2) as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_ref) <= 1e-5


@pytest.mark.parametrize("drop", [
    {"sliding_window": 4096}, {"global_rope_angles": 16}, {"global_rope_theta": 1e4},
    {"v_norm": False}, {"post_norms": False}, {"layer_scale": False}, {"logit_softcap": 0.0},
    {"activation": "swiglu"}, {"router_input": "ffn_norm"}, {"attn_scale": 0.0}, {"embed_scale": 1.0},
])
def test_every_gemma4_option_changes_the_logits(gemma4, hf_ref, drop):
    c = open_container(gemma4(32), verify=False)
    spec = dataclasses.replace(c.spec, **drop)
    assert rel_err(reference_logits(spec, c.array, IDS), hf_ref) > 1e-3
    assert rel_err(reference_logits(c.spec, c.array, IDS), hf_ref) <= 1e-5


def test_multimodal_checkpoint_runs_its_text_model(tmp_path):
    """`gemma4` (Gemma4ForConditionalGeneration): the text model under model.language_model.* and text_config."""
    from edgemoe_export import export
    from tiny_gemma4 import build_tiny_gemma4

    d = build_tiny_gemma4(tmp_path / "mm", multimodal=True)
    assert json.loads((d / "config.json").read_text())["model_type"] == "gemma4"
    path = export(d, tmp_path / "mm.emoe", bits=32, show_progress=False)
    with edgemoe.load(path, engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), hf_logits(d, IDS)) <= 1e-5


def test_multimodal_checkpoint_without_its_text_model_is_refused(tmp_path):
    from edgemoe_export import export
    from safetensors.numpy import load_file, save_file
    from tiny_gemma4 import build_tiny_gemma4

    d = build_tiny_gemma4(tmp_path / "mm", multimodal=True)
    tensors = load_file(str(d / "model.safetensors"))
    save_file({k.replace("language_model", "vision_tower"): v for k, v in tensors.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"no text model tensors \(model\.language_model"):
        export(d, tmp_path / "x.emoe", bits=32, show_progress=False)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["text_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="no text_config"):
        export(d, tmp_path / "x.emoe", bits=32, show_progress=False)
    assert not (tmp_path / "x.emoe").exists()


@pytest.mark.parametrize("change,match", [
    ({"enable_moe_block": False}, "enable_moe_block"), ({"hidden_size_per_layer_input": 16}, "per-layer input"),
    ({"num_kv_shared_layers": 2}, "KV sharing"), ({"use_bidirectional_attention": "all"}, "bidirectional"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "'yarn'"),
])
def test_unsupported_gemma4_variants_are_refused(change, match):
    from edgemoe_export.families import gemma4_spec
    from tiny_gemma4 import TEXT

    with pytest.raises(UnsupportedModelError, match=match):
        gemma4_spec({**TEXT, "model_type": "gemma4_text", **change})


def test_c_prefill_equals_token_by_token_decode(gemma4):
    ids = np.random.default_rng(5).integers(3, 320, 70)  # > one 64-token block, > the window
    with edgemoe.load(gemma4(32), engine="c", threads=2, max_ctx=128) as m:
        full = m._engine.prefill(ids)
    with edgemoe.load(gemma4(32), engine="c", threads=2, max_ctx=128) as m:
        last = m._engine.prefill(ids[:1])
        for t in ids[1:]:
            last = m._engine.decode(int(t))
    np.testing.assert_allclose(last, full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_python_and_c_tensor_tables_agree(gemma4):
    path = gemma4(32)
    spec = open_container(path, verify=False).spec
    py = model_tensors(spec)
    names = {n: shape for n, shape, _ in py}
    assert names["blk.2.attn_q.weight"] == (128, 64) and names["blk.1.attn_q.weight"] == (96, 64)
    assert "blk.2.attn_v.weight" not in names and names["blk.1.attn_v.weight"] == (48, 64)
    assert names["blk.2.attn_k_norm.weight"] == (32,) and names["blk.0.layer_output_scale.weight"] == (1,)
    h = N.open_resident(path, 8, False, 1)
    try:
        assert h.tensors() == py
    finally:
        h.close()


@pytest.mark.parametrize("bits", [32, 4])
def test_budgeted_run_is_bit_identical_to_resident(gemma4, bits):
    from test_budget import greedy_logits, minimum_budget

    path = gemma4(bits)
    ids = np.random.default_rng(3).integers(3, 320, 70).tolist()
    with edgemoe.load(path, max_ctx=128, threads=2) as ref:
        toks_ref, logits_ref = greedy_logits(ref._engine, ids, 10)
    budget = minimum_budget(path, 128, threads=2)
    with edgemoe.load(path, memory_budget=budget, max_ctx=128, threads=2) as m:
        assert m.engine_name == "c-stream"
        toks, logits = greedy_logits(m._engine, ids, 10)
        assert m.stats["evictions"] > 0
    assert toks == toks_ref
    for a, b in zip(logits, logits_ref):
        np.testing.assert_array_equal(a, b)


def test_f16_container_is_transformers_on_f16_weights(gemma4, hf_ref):
    """The f16 container against transformers with the same weights rounded to f16 (the router differs only by its
    folded scales' rounding), and against f32 transformers: this tiny model's post-norms amplify rounding (f16 alone
    moves it 6.4e-3; tiny qwen3moe 1.1e-3)."""
    with edgemoe.load(gemma4(16), engine="c", threads=2) as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_logits(gemma4.dir, IDS, round_fp16=True)) <= 2e-3
    assert rel_err(ours, hf_ref) <= 1e-2


# Measured 0.29 (8 bits) and 0.68 (4 bits) against f32 transformers: the default quantized export also stores the
# dense matrices as Q8_0 and runs them on Q8 activations, which this tiny model amplifies (see above); with f32
# activations the C engine equals the NumPy engine on the same quantized weights.
@pytest.mark.parametrize("bits,tol", [(8, 0.4), (4, 0.9)])
def test_quantized_containers_stay_near_transformers(gemma4, hf_ref, bits, tol):
    with edgemoe.load(gemma4(bits), engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), hf_ref) <= tol
        m._engine._h.set_q8_f32_act(True)
        exact = m.logits(IDS)
    with edgemoe.load(gemma4(bits), engine="numpy") as m:
        assert rel_err(exact, m.logits(IDS)) <= 1e-5


def test_c_engine_equals_numpy_engine_on_the_f16_container(gemma4):
    outs = []
    for engine in ("c", "numpy"):
        with edgemoe.load(gemma4(16), engine=engine, threads=2) as m:
            outs.append(m.logits(IDS))
    assert rel_err(outs[0], outs[1]) <= 1e-5


def test_calibration_routes_like_the_reference_forward(gemma4):
    """MWQ calibration runs the Gemma-4 layers (the MoE block beside the dense MLP, its router on the normalized
    residual, the layer scale): its per-layer routing counts equal the reference forward's on the same sequences."""
    from edgemoe_export import open_checkpoint
    from edgemoe_export.calibrate import calibrate

    seqs = [np.random.default_rng(s).integers(3, 320, 20) for s in range(3)]
    got = {cal.layer: cal.freq for cal in calibrate(open_checkpoint(gemma4.dir), seqs, group_size=8)}
    c = open_container(gemma4(32), verify=False)
    want = {layer: np.zeros(5) for layer in range(5)}

    def count(layer, ids, weights):
        want[layer] += np.bincount(ids.reshape(-1), minlength=5)

    for s in seqs:
        reference_logits(c.spec, c.array, s, on_route=count)
    for layer in range(5):
        np.testing.assert_array_equal(got[layer], want[layer])


def test_merged_experts_run_the_same_in_both_engines(gemma4, tmp_path):
    """MC-SMoE merging runs through the Gemma-4 layer (calibration, grouping, the folded down matrices): the merged
    container keeps fewer stored experts and the C engine computes it as the reference does."""
    from edgemoe_export import export

    path = export(gemma4.dir, tmp_path / "m.emoe", bits=32, merge_ratio=0.6, calib=gemma4.dir.parent / "calib.txt",
                  calib_tokens=512, show_progress=False)
    spec = open_container(path, verify=False).spec
    assert spec.expert_map and all(spec.stored_experts(layer) < 5 for layer in range(5))
    outs = []
    for engine in ("c", "numpy"):
        with edgemoe.load(path, engine=engine, threads=2) as m:
            outs.append(m.logits(IDS))
    assert rel_err(outs[0], outs[1]) <= 1e-5


def test_arch_reader_checks_the_gemma4_fields(gemma4):
    spec = open_container(gemma4(32), verify=False).spec
    for bad, match in (({"global_kv_heads": 3}, "global_kv_heads"), ({"global_rope_angles": 17}, "global_rope_angles"),
                       ({"global_rope_angles": 0}, "global_rope_angles"), ({"logit_softcap": -1.0}, "logit_softcap")):
        with pytest.raises(N.NativeError, match=match):
            N.arch_check(json.dumps({**spec.to_json(), **bad}))
    plain = {k: v for k, v in spec.to_json().items() if not k.startswith("global_")}  # an odd head, no global sizes
    N.arch_check(json.dumps({**plain, "head_dim": 25, "rope_dim": 24}))
    with pytest.raises(EdgeMoEError, match="unknown field 'attn_softcap'"):
        type(spec).from_json({**spec.to_json(), "attn_softcap": 50.0})


# --- GGUF: llama.cpp's `gemma4` ----------------------------------------------------------------------------------

def _gelu_f16_table(x):
    """ggml's CPU GELU: gelu_tanh of x rounded to f16, looked up in an f16 table (x itself beyond +-10)."""
    y = R_GELU(x.astype(np.float16).astype(np.float32)).astype(np.float16).astype(np.float32)
    return np.where(x <= -10, 0.0, np.where(x >= 10, x, y)).astype(np.float32)


R_GELU = __import__("edgemoe.reference", fromlist=["gelu_tanh"]).gelu_tanh


def test_gguf_f32_runs_in_llama_cpp_like_transformers(gemma4, hf_ref, tmp_path, monkeypatch):
    """llama.cpp's gemma4 runs the exported file: within 2e-3 of transformers, the same greedy choices, and within
    2e-4 of edgemoe's reference once that uses ggml's f16 GELU table (the gap's cause)."""
    importlib.import_module("llama_cpp")
    from edgemoe_export.gguf_export import export_gguf
    from test_gguf import llama_logits

    import edgemoe.reference as R

    got = llama_logits(export_gguf(gemma4.dir, tmp_path / "g.gguf", "F32", show_progress=False), IDS)
    assert rel_err(got, hf_ref) <= 2e-3
    assert (got.argmax(-1) == hf_ref.argmax(-1)).all()
    c = open_container(gemma4(32), verify=False)
    monkeypatch.setattr(R, "gelu_tanh", _gelu_f16_table)
    assert rel_err(got, reference_logits(c.spec, c.array, IDS)) <= 2e-4


def test_gguf_greedy_tokens_match_edgemoe(gemma4, tmp_path):
    importlib.import_module("llama_cpp")
    from edgemoe_export.gguf_export import export_gguf
    from test_gguf import _llama

    path = export_gguf(gemma4.dir, tmp_path / "g.gguf", "F32", show_progress=False)
    emoe = gemma4(32)
    ours, theirs = greedy_tokens(emoe, path, [int(t) for t in IDS[:8]], 12, _llama)
    assert theirs == ours


def test_gguf_import_reads_llama_cpp_gemma4_back(gemma4, hf_ref, tmp_path):
    """GGUF -> edgemoe: the description comes back from llama.cpp's keys (per-layer KV heads, sliding pattern, both
    head sizes, rope_freqs as proportional RoPE) and the weights from its names (router scale, fused experts)."""
    importlib.import_module("gguf")
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf

    g = export_gguf(gemma4.dir, tmp_path / "g.gguf", "F32", show_progress=False)
    path = export(g, tmp_path / "from_gguf.emoe", bits=32, show_progress=False)
    s, want = open_container(path, verify=False).spec, open_container(gemma4(32), verify=False).spec
    assert dataclasses.replace(s, tie_embeddings=True, max_position=want.max_position) == want  # head written out
    with edgemoe.load(path, engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), hf_ref) <= 1e-5


def test_gguf_refuses_a_layer_llama_cpp_does_not_have(gemma4, tmp_path):
    from edgemoe_export.gguf_export import _check_supported

    spec = dataclasses.replace(open_container(gemma4(32), verify=False).spec, v_norm=False)
    with pytest.raises(EdgeMoEError, match="gemma4 graph.*v_norm"):
        _check_supported(spec, "gemma4")


def test_onnx_export_refuses_gemma4_by_name(gemma4, tmp_path):
    importlib.import_module("onnx")
    from edgemoe_export.onnx_export import export_onnx

    with pytest.raises(EdgeMoEError, match="gemma4"):
        export_onnx(gemma4.dir, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists() or not any((tmp_path / "onnx").iterdir())
