"""Qwen3.5/3.6-MoE (`qwen3_5_moe_text`): a tiny transformers 5 checkpoint -> export -> edgemoe, against transformers
and itself. New layer kind: Gated DeltaNet (linear_attn_layers, native/src/deltanet.c) with a recurrent state."""

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
from edgemoe.errors import EdgeMoEError, UnsupportedModelError
from edgemoe.reference import reference_logits

N = importlib.import_module("edgemoe._native")
importlib.import_module("edgemoe_export")


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    """(bits) -> container; .dir is the HF checkpoint."""
    from tiny_qwen35 import build_tiny_qwen35

    return family_exports(tmp_path_factory, "qwen35", build_tiny_qwen35)


@pytest.fixture(scope="module")
def hf_ref(qwen35):
    return hf_logits(qwen35.dir, IDS)


def test_reader_describes_the_hybrid_layers(qwen35):
    s = open_container(qwen35(32), verify=False).spec
    assert (s.family, s.n_experts, s.top_k, s.expert_ffn, s.head_dim, s.rope_dim) == ("qwen35moe", 5, 3, 40, 24, 6)
    assert s.linear_attn_layers == [0, 2, 3] and s.attn_gate and s.qk_norm == "head"
    assert (s.linear_k_heads, s.linear_v_heads, s.linear_k_dim, s.linear_v_dim, s.linear_conv) == (2, 4, 16, 12, 4)
    assert s.shared_ffn == 36 and s.shared_gate and s.norm_topk and s.router_fn == "softmax"


@pytest.mark.parametrize("engine", ["numpy", "c"])
def test_qwen35_fp32_logits_match_transformers(qwen35, hf_ref, engine):
    with edgemoe.load(qwen35(32), engine=engine, threads=2) as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_ref) <= 1e-5


@pytest.mark.parametrize("drop", [{"attn_gate": False}, {"linear_conv": 3}, {"rope_dim": 24}])
def test_every_qwen35_option_changes_the_logits(qwen35, hf_ref, drop):
    c = open_container(qwen35(32), verify=False)
    spec = dataclasses.replace(c.spec, **drop)

    def w(name):  # a 3-tap conv: each channel without its oldest tap
        a = c.array(name)
        return a.reshape(-1, 4)[:, 1:].reshape(-1) if drop.get("linear_conv") and "ssm_conv1d" in name else a

    assert rel_err(reference_logits(spec, w, IDS), hf_ref) > 1e-3
    assert rel_err(reference_logits(c.spec, c.array, IDS), hf_ref) <= 1e-5


def test_c_prefill_equals_token_by_token_decode(qwen35):
    with edgemoe.load(qwen35(32), engine="c", threads=2) as m:
        full = m._engine.prefill(IDS)
    with edgemoe.load(qwen35(32), engine="c", threads=2) as m:
        last = m._engine.prefill(IDS[:1])
        for t in IDS[1:]:
            last = m._engine.decode(int(t))
    np.testing.assert_array_equal(last, full)  # one recurrent form for both: the same bits


def test_a_reset_clears_the_recurrent_state(qwen35):
    other = np.random.default_rng(5).integers(3, 320, 30)
    with edgemoe.load(qwen35(32), engine="c", threads=2) as m:
        fresh = m._engine.prefill(IDS)
        m._engine.prefill(other)  # fills the state with another sequence
        again = m._engine.prefill(IDS)  # a prefill starts over
        m._engine.reset()
        after_reset = m._engine.prefill(IDS)
    np.testing.assert_array_equal(again, fresh)
    np.testing.assert_array_equal(after_reset, fresh)


def test_the_recurrent_state_cannot_be_rewound(qwen35):
    with edgemoe.load(qwen35(32), engine="c", threads=2) as m:
        m._engine.prefill(IDS)
        with pytest.raises(EdgeMoEError, match="recurrent state that cannot be rewound"):
            m._engine.truncate(10)
        m._engine.truncate(len(IDS))  # keeping everything is fine
        m._engine.truncate(0)  # and so is starting over


def test_prompt_reuse_starts_over_where_the_state_cannot_rewind(qwen35):
    """Model.generate keeps the KV cache's common prefix; a recurrent state cannot be cut back to it, so a prompt
    that diverges from the cached one is run from the start, and the answer is the fresh one."""
    a, b = [int(t) for t in IDS[:12]], [int(t) for t in IDS[:8]] + [7, 8, 9]
    with edgemoe.load(qwen35(32), engine="c", threads=2) as m:
        fresh = m.generate(b, max_new_tokens=4, temperature=0)
    with edgemoe.load(qwen35(32), engine="c", threads=2) as m:
        m.generate(a, max_new_tokens=2, temperature=0)
        assert m.generate(b, max_new_tokens=4, temperature=0) == fresh
        m.generate(list(m._engine.cached_ids) + [5], max_new_tokens=1, temperature=0)  # extends it: reused
        assert m.stats["prompt_tokens_reused"] > 0


def test_context_shift_reruns_the_shifted_context(qwen35):
    """With a recurrent state the shift re-runs the kept context from position 0: the C engine then generates what
    the NumPy engine (which recomputes the whole sequence every step) generates."""
    prompt = [int(t) for t in IDS[:10]]
    out = []
    for engine in ("c", "numpy"):
        with edgemoe.load(qwen35(32), engine=engine, threads=2, max_ctx=16) as m:
            out.append(m.generate(prompt, max_new_tokens=14, temperature=0, context_shift=True, n_keep=2,
                                  stop_at_eos=False, return_info=True))
    assert out[0].context_shifts > 0 and out[0].text == out[1].text


def test_a_failed_block_restarts_the_sequence(qwen35, tmp_path):
    """A read error in the middle of a block leaves the DeltaNet state advanced past the sequence's positions: the core
    starts the sequence over (n_past 0), so the next call cannot silently continue from a corrupted state."""
    import shutil

    from test_budget import minimum_budget
    from test_changed_file import _overwrite_experts_in_place

    path = shutil.copy(qwen35(32), tmp_path / "q.emoe")
    budget = minimum_budget(path, 128, threads=2)
    with edgemoe.load(path, memory_budget=budget, max_ctx=128, threads=2) as m:
        fresh = m._engine.prefill(IDS)
        m._engine.prefill(IDS[:10])
        _overwrite_experts_in_place(path)
        m.drop_cache()
        with pytest.raises(EdgeMoEError, match="checksum mismatch"):
            m._engine.extend(IDS[10:])
        assert m._engine.seq_n_past(0) == 0 and m._engine.cached_ids == []
        _overwrite_experts_in_place(path)  # restored in place: reads pass their checks again
        m.drop_cache()
        np.testing.assert_array_equal(m._engine.prefill(IDS), fresh)


def test_a_batch_keeps_one_recurrent_state_per_sequence(qwen35):
    prompts = [[int(t) for t in IDS[:9]], [int(t) for t in IDS[5:20]], [7, 8, 9]]
    with edgemoe.load(qwen35(32), engine="c", threads=2) as m:
        one_by_one = [m.generate(p, max_new_tokens=6, temperature=0, stop_at_eos=False) for p in prompts]
        assert m.generate_batch(prompts, max_new_tokens=6, stop_at_eos=False) == one_by_one


def test_python_and_c_tensor_tables_agree(qwen35):
    path = qwen35(32)
    spec = open_container(path, verify=False).spec
    py = model_tensors(spec)
    assert ("blk.0.ssm_conv1d.weight", (112 * 4,), True) in py and ("blk.1.attn_gate.weight", (96, 64), True) in py
    assert not any(n.startswith("blk.0.attn_q.") for n, _, _ in py)  # linear layers have no attention tensors
    h = N.open_resident(path, 8, False, 1)
    try:
        assert h.tensors() == py
    finally:
        h.close()


def test_the_budget_counts_the_recurrent_state_like_the_kv_cache(qwen35):
    with pytest.raises(N.BudgetError) as e:
        edgemoe.load(qwen35(32), memory_budget=1, max_ctx=128, threads=2)
    kv = 2 * 2 * 128 * (2 * 24) * 4  # K and V of the 2 attention layers (the DeltaNet layers have none), f32
    conv_dim = 2 * 2 * 16 + 4 * 12
    state = 3 * ((4 - 1) * conv_dim + 4 * 16 * 12) * 4  # 3 DeltaNet layers: conv window + S per value head
    assert e.value.plan["kv_bytes"] == kv + state


def test_calibration_runs_through_the_deltanet_layers(qwen35):
    """The quantized exports calibrate on text (reference forward, gated_deltanet included): the Gram-weighted MWQ
    fit and the pre-attention predictor of every layer come from it."""
    c = open_container(qwen35(4), verify=False)
    assert all(f"blk.{i}.ffn_gate_inp_pre.weight" in c.tensors for i in range(5))


def test_merged_experts_run_the_same_in_c_and_numpy(qwen35, tmp_path):
    from edgemoe_export import export

    path = export(qwen35.dir, tmp_path / "m.emoe", bits=32, experts_per_layer=3, calib=None, calib_tokens=512,
                  show_progress=False)
    spec = open_container(path, verify=False).spec
    assert spec.expert_map and max(spec.expert_map[0]) == 2
    outs = []
    for engine in ("c", "numpy"):
        with edgemoe.load(path, engine=engine, threads=2) as m:
            outs.append(m.logits(IDS))
    assert rel_err(outs[0], outs[1]) <= 1e-5


@pytest.mark.parametrize("bits", [32, 4])
def test_budgeted_run_is_bit_identical_to_resident(qwen35, bits):
    from test_budget import greedy_logits, minimum_budget

    path = qwen35(bits)
    ids = np.random.default_rng(3).integers(3, 320, 70).tolist()  # > one 64-token block
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


def test_f16_container_matches_transformers_on_the_same_rounded_weights(qwen35):
    """The f16 container stores matrices in f16 and 1-D tensors (norms, conv taps, A_log, dt_bias) in f32: transformers
    with exactly those weights rounded gives the same logits (the shared-expert gate vector is 1-D here: f32)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(qwen35.dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name and "shared_expert_gate" not in name:
                p.copy_(p.half().float())
        ref = model(torch.tensor(IDS)[None]).logits[0].numpy()
    with edgemoe.load(qwen35(16), engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), ref) <= 1e-5


# The tiny hybrid model is touchy: a 1e-3 relative change of the embeddings alone moves its logits by 0.14 (routing
# flips among 5 experts at top-3 in every layer). Measured: f16 7.5e-3, 8-bit 0.39, 4-bit 0.48 (the default quantized
# export also stores dense matrices as Q8_0 and runs them on Q8 activations); the bounds keep a margin over those.
@pytest.mark.parametrize("bits,tol", [(16, 1e-2), (8, 0.5), (4, 0.6)])
def test_quantized_containers_stay_near_transformers(qwen35, hf_ref, bits, tol):
    with edgemoe.load(qwen35(bits), engine="c", threads=2) as m:
        err = rel_err(m.logits(IDS), hf_ref)
    assert err <= tol


def test_c_engine_equals_numpy_engine_on_the_f16_container(qwen35):
    outs = []
    for engine in ("c", "numpy"):
        with edgemoe.load(qwen35(16), engine=engine, threads=2) as m:
            outs.append(m.logits(IDS))
    assert rel_err(outs[0], outs[1]) <= 1e-5


def test_qwen3_next_fused_projections_and_dense_layers_match_transformers(tmp_path):
    from edgemoe_export import export
    from tiny_qwen35 import build_tiny_qwen35

    ckpt = build_tiny_qwen35(tmp_path / "next", model_type="qwen3_next")
    path = export(ckpt, tmp_path / "next.emoe", bits=32, show_progress=False)
    s = open_container(path, verify=False).spec
    assert s.family == "qwen3next" and s.dense_layers == [2] and not s.norm_topk and s.linear_attn_layers == [0, 2, 3]
    ref = hf_logits(ckpt, IDS)
    for engine in ("numpy", "c"):
        with edgemoe.load(path, engine=engine, threads=2) as m:
            assert rel_err(m.logits(IDS), ref) <= 1e-5


def test_onnx_and_next_gguf_exports_are_refused_with_the_reason(qwen35, tmp_path):
    from edgemoe_export.gguf_export import export_gguf
    from edgemoe_export.onnx_export import export_onnx
    from tiny_qwen35 import build_tiny_qwen35

    with pytest.raises(EdgeMoEError, match="GatedDeltaNet"):
        export_onnx(qwen35.dir, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    nxt = build_tiny_qwen35(tmp_path / "next", model_type="qwen3_next")
    with pytest.raises(EdgeMoEError, match="'qwen3next'"):
        export_gguf(nxt, tmp_path / "n.gguf", "F32", show_progress=False)


def test_the_multimodal_checkpoint_exports_its_text_model(tmp_path):
    """The published Qwen3.5/3.6 checkpoints are `qwen3_5_moe` (text_config + a vision tower, the text model's
    tensors under model.language_model.): the text model is read, and computes what transformers' does on text."""
    import torch
    import transformers as tf
    from edgemoe_export import export
    from tiny_qwen35 import CONFIG

    vision = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
              "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 16}
    cfg = tf.AutoConfig.for_model("qwen3_5_moe", text_config=dict(CONFIG), vision_config=vision)
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.1)
        ref = model(input_ids=torch.tensor(IDS)[None]).logits[0].numpy()
    model.save_pretrained(tmp_path / "mm")
    path = export(tmp_path / "mm", tmp_path / "mm.emoe", bits=32, show_progress=False)
    assert open_container(path, verify=False).spec.family == "qwen35moe"
    with edgemoe.load(path, engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), ref) <= 1e-5


def test_unsupported_qwen35_variants_are_refused():
    from edgemoe_export.families import qwen35moe_spec
    from tiny_qwen35 import CONFIG

    base = {**CONFIG, "model_type": "qwen3_5_moe_text"}
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        qwen35moe_spec({**base, "layer_types": ["linear_attention", "sliding_attention"] + CONFIG["layer_types"][2:]})
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        qwen35moe_spec({**base, "attention_bias": True})
    assert isinstance(qwen35moe_spec(base), ArchSpec)


# --- GGUF: llama.cpp's `qwen35moe` -------------------------------------------------------------------------------

# llama.cpp's DeltaNet needs key and value heads of one size and full attention every n-th layer; the variant keeps
# two value heads per key head, so the exporter's head reordering (tiled in llama.cpp, grouped in transformers) is
# exercised.
GGUF_VARIANT = {"linear_key_head_dim": 12, "linear_value_head_dim": 12, "num_hidden_layers": 4,
                "layer_types": ["linear_attention"] * 3 + ["full_attention"]}


@pytest.fixture(scope="module")
def gguf_ckpt(tmp_path_factory):
    from tiny_qwen35 import build_tiny_qwen35

    return build_tiny_qwen35(tmp_path_factory.mktemp("qwen35_gguf") / "ckpt", **GGUF_VARIANT)


def test_gguf_f32_runs_in_llama_cpp_like_transformers(gguf_ckpt, tmp_path):
    importlib.import_module("llama_cpp")
    from edgemoe_export.gguf_export import export_gguf
    from test_gguf import llama_logits

    path = export_gguf(gguf_ckpt, tmp_path / "q.gguf", "F32", show_progress=False)
    got, ref = llama_logits(path, IDS), hf_logits(gguf_ckpt, IDS)
    assert rel_err(got, ref) <= 1e-5  # measured 3.9e-6; without the v-head reordering 1.18
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_gguf_from_the_container_runs_like_transformers(gguf_ckpt, tmp_path):
    """The container stores the split attention gate, the offset norms and the flattened conv taps: written back to
    llama.cpp's layout they give the same model."""
    importlib.import_module("llama_cpp")
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf_from_container
    from test_gguf import llama_logits

    c = export(gguf_ckpt, tmp_path / "q.emoe", bits=32, show_progress=False)
    path = export_gguf_from_container(c, tmp_path / "c.gguf", "F32", show_progress=False)
    assert rel_err(llama_logits(path, IDS), hf_logits(gguf_ckpt, IDS)) <= 1e-5


def test_gguf_greedy_tokens_match_edgemoe(gguf_ckpt, tmp_path):
    importlib.import_module("llama_cpp")
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf
    from llama_cpp import Llama

    path = export_gguf(gguf_ckpt, tmp_path / "q.gguf", "F32", show_progress=False)
    emoe = export(gguf_ckpt, tmp_path / "q.emoe", bits=32, show_progress=False)
    ours, theirs = greedy_tokens(emoe, path, [int(t) for t in IDS[:8]], 12, Llama)
    assert theirs == ours


def test_gguf_refuses_what_llama_cpp_cannot_run(qwen35, tmp_path):
    from edgemoe_export.gguf_export import export_gguf

    with pytest.raises(EdgeMoEError, match="linear_key_head_dim == linear_value_head_dim"):  # 16 vs 12
        export_gguf(qwen35.dir, tmp_path / "x.gguf", "F32", show_progress=False)
    assert not (tmp_path / "x.gguf").exists()
