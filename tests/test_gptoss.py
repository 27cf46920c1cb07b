"""gpt-oss (`gpt_oss`): a tiny transformers 5 checkpoint -> export -> edgemoe, against transformers and itself.

The tiny model (tiny_gptoss.py) makes every gpt-oss option matter on a 24-token sequence; the feature test shows it:
dropping any one of them from the description moves the logits far from transformers'."""

import dataclasses
import importlib

import numpy as np
import pytest
from conftest import hf_logits, rel_err
from family_exports import IDS, family_exports
from greedy_tokens import greedy_tokens

import edgemoe
from edgemoe.arch import ArchSpec, model_tensors
from edgemoe.container import open_container
from edgemoe.errors import UnsupportedModelError
from edgemoe.reference import reference_logits

N = importlib.import_module("edgemoe._native")
importlib.import_module("edgemoe_export")


@pytest.fixture(scope="module")
def gptoss(tmp_path_factory):
    """(bits) -> container; .dir is the HF checkpoint."""
    from tiny_gptoss import build_tiny_gptoss

    return family_exports(tmp_path_factory, "gptoss", build_tiny_gptoss)


@pytest.fixture(scope="module")
def hf_ref(gptoss):
    return hf_logits(gptoss.dir, IDS)


def test_reader_describes_every_gpt_oss_option(gptoss):
    s = open_container(gptoss(32), verify=False).spec
    assert (s.family, s.n_experts, s.top_k, s.expert_ffn, s.head_dim) == ("gptoss", 5, 3, 40, 24)
    assert s.attn_sinks and s.qkv_bias and s.o_bias and s.router_bias and s.expert_bias
    assert s.activation == "swiglu_clamp" and s.swiglu_limit == 1.5 and s.swiglu_alpha == pytest.approx(1.702)
    assert s.sliding_window == 5 and s.swa_layers == [0, 2]  # layer_types: sliding, full, sliding
    assert s.rope_scaling == "yarn" and s.rope_factor == 8.0 and s.yarn_orig_ctx == 4096 and not s.yarn_truncate
    assert s.rope_attn_factor == pytest.approx(0.1 * np.log(8.0) + 1.0)
    assert s.router_fn == "softmax" and s.norm_topk  # softmax over the top-k logits


@pytest.mark.parametrize("engine", ["numpy", "c"])
def test_gptoss_fp32_logits_match_transformers(gptoss, hf_ref, engine):
    with edgemoe.load(gptoss(32), engine=engine, threads=2) as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_ref) <= 1e-5


@pytest.mark.parametrize("drop", [
    {"swa_layers": [], "sliding_window": 0}, {"attn_sinks": False}, {"rope_scaling": "none"},
    {"rope_attn_factor": 1.0}, {"activation": "swiglu"}, {"router_bias": False}, {"expert_bias": False},
    {"o_bias": False},
])
def test_every_gpt_oss_option_changes_the_logits(gptoss, hf_ref, drop):
    c = open_container(gptoss(32), verify=False)
    spec = dataclasses.replace(c.spec, **drop)
    assert rel_err(reference_logits(spec, c.array, IDS), hf_ref) > 1e-3
    assert rel_err(reference_logits(c.spec, c.array, IDS), hf_ref) <= 1e-5


def test_c_prefill_equals_token_by_token_decode(gptoss):
    with edgemoe.load(gptoss(32), engine="c", threads=2) as m:
        full = m._engine.prefill(IDS)
    with edgemoe.load(gptoss(32), engine="c", threads=2) as m:
        last = m._engine.prefill(IDS[:1])
        for t in IDS[1:]:
            last = m._engine.decode(int(t))
    np.testing.assert_allclose(last, full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_python_and_c_tensor_tables_agree(gptoss):
    path = gptoss(32)
    spec = open_container(path, verify=False).spec
    py = model_tensors(spec)
    assert ("blk.0.attn_sinks.weight", (4,), True) in py and ("blk.1.ffn_up_exps.bias", (5, 40), True) in py
    h = N.open_resident(path, 8, False, 1)
    try:
        assert h.tensors() == py
    finally:
        h.close()


@pytest.mark.parametrize("bits", [32, 4])
def test_budgeted_run_is_bit_identical_to_resident(gptoss, bits):
    from test_budget import greedy_logits, minimum_budget

    path = gptoss(bits)
    ids = np.random.default_rng(3).integers(3, 320, 70).tolist()  # > one 64-token block, > the window
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


# Errors in line with the other families' (tiny qwen3moe, same export: 1.1e-3, 0.28, 0.22); the default quantized
# export also stores dense matrices as Q8_0 and runs them on Q8 activations.
@pytest.mark.parametrize("bits,tol", [(16, 5e-3), (8, 0.1), (4, 0.3)])
def test_quantized_containers_stay_near_transformers(gptoss, hf_ref, bits, tol):
    with edgemoe.load(gptoss(bits), engine="c", threads=2) as m:
        err = rel_err(m.logits(IDS), hf_ref)
    assert err <= tol


def test_c_engine_equals_numpy_engine_on_the_f16_container(gptoss):
    outs = []
    for engine in ("c", "numpy"):
        with edgemoe.load(gptoss(16), engine=engine, threads=2) as m:
            outs.append(m.logits(IDS))
    assert rel_err(outs[0], outs[1]) <= 1e-5


def test_unsupported_gpt_oss_variants_are_refused():
    from edgemoe_export.families import gpt_oss_spec
    from tiny_gptoss import CONFIG

    base = {**CONFIG, "model_type": "gpt_oss", "num_hidden_layers": 2}
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        gpt_oss_spec({**base, "layer_types": ["sliding_attention", "chunked_attention"]})
    with pytest.raises(UnsupportedModelError, match="longrope"):
        gpt_oss_spec({**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    assert isinstance(gpt_oss_spec(base), ArchSpec)


def test_mxfp4_experts_are_read_like_transformers_dequantizes_them(tmp_path):
    """A checkpoint with MXFP4 experts (the published layout) exports to the same model transformers runs after its
    own dequantizer (integrations.mxfp4.convert_moe_packed_tensors) unpacks the same blocks and scales."""
    import torch
    import transformers as tf
    from edgemoe_export import export
    from safetensors.numpy import load_file
    from tiny_gptoss import build_tiny_gptoss, mxfp4_copy
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = build_tiny_gptoss(tmp_path / "bf", intermediate_size=64)  # MXFP4 groups are 32 inputs
    d = mxfp4_copy(src, tmp_path / "mxfp4")
    packed = load_file(str(d / "model.safetensors"))
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for leaf in ("gate_up_proj", "down_proj"):
                k = f"model.layers.{i}.mlp.experts.{leaf}"
                w = convert_moe_packed_tensors(torch.from_numpy(packed[k + "_blocks"]),
                                               torch.from_numpy(packed[k + "_scales"]), dtype=torch.float32)
                assert not torch.equal(w, getattr(layer.mlp.experts, leaf))  # really quantized
                getattr(layer.mlp.experts, leaf).copy_(w)
        ref = model(torch.tensor(IDS)[None]).logits[0].numpy()
    path = export(d, tmp_path / "mxfp4.emoe", bits=32, show_progress=False)
    with edgemoe.load(path, engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), ref) <= 1e-5


def test_unknown_quantization_is_refused():
    from edgemoe_export.families import gpt_oss_spec
    from tiny_gptoss import CONFIG

    with pytest.raises(UnsupportedModelError, match="quantization 'fp8'"):
        gpt_oss_spec({**CONFIG, "model_type": "gpt_oss", "num_hidden_layers": 2,
                      "quantization_config": {"quant_method": "fp8"}})


# --- GGUF: llama.cpp's `gpt-oss` ---------------------------------------------------------------------------------

# llama.cpp hard-codes swiglu limit 7 and always rounds YaRN's correction range: the GGUF variant of the tiny model
# uses those (the default tiny model's limit 1.5 is refused: run anyway, llama.cpp's logits differ by ~0.5;
# truncate=false, as in the published configs, is written with a warning: it differs by ~2e-3).
GGUF_VARIANT = {"swiglu_limit": 7.0, "rope_parameters": {
    "rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
    "original_max_position_embeddings": 4096}}


@pytest.fixture(scope="module")
def gguf_ckpt(tmp_path_factory):
    from tiny_gptoss import build_tiny_gptoss

    return build_tiny_gptoss(tmp_path_factory.mktemp("gptoss_gguf") / "ckpt", **GGUF_VARIANT)


def test_gguf_f32_runs_in_llama_cpp_like_transformers(gguf_ckpt, tmp_path):
    importlib.import_module("llama_cpp")
    from edgemoe_export.gguf_export import export_gguf
    from test_gguf import llama_logits

    path = export_gguf(gguf_ckpt, tmp_path / "g.gguf", "F32", show_progress=False)
    got, ref = llama_logits(path, IDS), hf_logits(gguf_ckpt, IDS)
    assert rel_err(got, ref) <= 1e-5
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_gguf_greedy_tokens_match_edgemoe(gguf_ckpt, tmp_path):
    importlib.import_module("llama_cpp")
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf
    from llama_cpp import Llama

    path = export_gguf(gguf_ckpt, tmp_path / "g.gguf", "F32", show_progress=False)
    emoe = export(gguf_ckpt, tmp_path / "g.emoe", bits=32, show_progress=False)
    ours, theirs = greedy_tokens(emoe, path, [int(t) for t in IDS[:8]], 12, Llama)
    assert theirs == ours


def test_gguf_refuses_what_llama_cpp_hard_codes(gptoss, tmp_path):
    from edgemoe_export.gguf_export import export_gguf

    from edgemoe.errors import EdgeMoEError

    with pytest.raises(EdgeMoEError, match="hard-codes swiglu"):  # the default tiny model: limit 1.5
        export_gguf(gptoss.dir, tmp_path / "x.gguf", "F32", show_progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_of_an_untruncated_yarn_model_warns(tmp_path):
    from edgemoe_export.gguf_export import export_gguf
    from tiny_gptoss import build_tiny_gptoss

    d = build_tiny_gptoss(tmp_path / "ckpt", swiglu_limit=7.0)  # truncate=false, as gpt-oss-20b's config
    with pytest.warns(UserWarning, match="truncate"):
        export_gguf(d, tmp_path / "x.gguf", "F32", show_progress=False)
    assert (tmp_path / "x.gguf").exists()


def test_gguf_import_reads_llama_cpp_gpt_oss_back(gguf_ckpt, tmp_path):
    """GGUF -> edgemoe: the description comes back from llama.cpp's keys (sliding window on even layers, YaRN,
    the hard-coded SwiGLU) and the weights from its names (post_attention_norm, sinks, biases)."""
    importlib.import_module("gguf")
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf

    g = export_gguf(gguf_ckpt, tmp_path / "g.gguf", "F32", show_progress=False)
    path = export(g, tmp_path / "from_gguf.emoe", bits=32, show_progress=False)
    spec = open_container(path, verify=False).spec
    assert spec.family == "gptoss" and spec.rope_scaling == "yarn" and spec.swa_layers == [0, 2]
    with edgemoe.load(path, engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), hf_logits(gguf_ckpt, IDS)) <= 1e-5


def test_calibration_routes_like_the_reference_forward(gptoss):
    """MWQ calibration runs the gpt-oss layers (router bias, biased clamped experts, sinks, sliding window): its
    per-layer routing counts equal the reference forward's on the same sequences."""
    from edgemoe_export import open_checkpoint
    from edgemoe_export.calibrate import calibrate

    seqs = [np.random.default_rng(s).integers(3, 320, 20) for s in range(3)]
    ckpt = open_checkpoint(gptoss.dir)
    got = {cal.layer: cal.freq for cal in calibrate(ckpt, seqs, group_size=8)}
    c = open_container(gptoss(32), verify=False)
    want = {layer: np.zeros(5) for layer in range(3)}

    def count(layer, ids, weights):
        want[layer] += np.bincount(ids.reshape(-1), minlength=5)

    for s in seqs:
        reference_logits(c.spec, c.array, s, on_route=count)
    for layer in range(3):
        np.testing.assert_array_equal(got[layer], want[layer])


def test_merging_experts_with_biases_is_refused(gptoss, tmp_path):
    from edgemoe_export.merge_stage import export_merged

    from edgemoe.errors import EdgeMoEError

    with pytest.raises(EdgeMoEError, match="expert_bias"):
        export_merged(gptoss.dir, tmp_path / "m.emoe", merge_ratio=0.6)
    assert not (tmp_path / "m.emoe").exists()


def test_onnx_export_refuses_gpt_oss_by_name(gptoss, tmp_path):
    importlib.import_module("onnx")
    from edgemoe_export.onnx_export import export_onnx

    from edgemoe.errors import EdgeMoEError

    with pytest.raises(EdgeMoEError, match="attn_sinks.*container"):
        export_onnx(gptoss.dir, tmp_path / "onnx")
