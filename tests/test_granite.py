"""Granite-MoE (granitemoe, granitemoeshared) end to end against transformers' modeling_granitemoe(shared).

The tiny checkpoints (tiny_models.py) set every multiplier away from 1 (embedding 3, attention 0.07 instead of
1/sqrt(head_dim), residual 0.6, logits divided by 2.5), an odd expert count and top-k >= 2, fused expert weights
(input_linear = gate rows then up rows), and the shared variant adds an ungated shared MLP with tied embeddings.
"""

import dataclasses
import importlib

import numpy as np
import pytest
from conftest import hf_logits, rel_err
from tiny_models import GRANITE

import edgemoe
from edgemoe.container import open_container
from edgemoe.reference import reference_logits

N = importlib.import_module("edgemoe._native")
importlib.import_module("edgemoe_export")

IDS = np.random.default_rng(0).integers(3, 320, 24)
CALIB = "the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. " * 60
SCALES = {"embed_scale": 1.0, "attn_scale": 0.0, "residual_scale": 1.0, "logit_divisor": 1.0}  # the defaults


@pytest.mark.parametrize("engine", ["numpy", "c"])
@pytest.mark.parametrize("family", GRANITE)
def test_fp32_container_matches_transformers(family, engine, tiny_dir, tiny_emoe):
    spec = open_container(tiny_emoe(family, 32)).spec
    with edgemoe.load(tiny_emoe(family, 32), engine=engine, threads=2) as m:
        ours = m.logits(IDS)
    assert spec.residual_scale == pytest.approx(0.6) and spec.attn_scale == pytest.approx(0.07)
    assert spec.norm_topk and spec.router_fn == "softmax"
    assert (spec.shared_ffn == 56) == (family == "granitemoeshared") and not spec.shared_gate
    assert rel_err(ours, hf_logits(tiny_dir(family), IDS)) <= 1e-5


@pytest.mark.parametrize("family", GRANITE)
def test_every_multiplier_is_needed_for_parity(family, tiny_dir, tiny_emoe):
    # The parity above is not luck: dropping any one scaling (back to its default) breaks it by orders of magnitude.
    c = open_container(tiny_emoe(family, 32))
    ref = hf_logits(tiny_dir(family), IDS)
    assert rel_err(reference_logits(c.spec, c.array, IDS), ref) <= 1e-5
    for field, default in SCALES.items():
        wrong = dataclasses.replace(c.spec, **{field: default})
        assert rel_err(reference_logits(wrong, c.array, IDS), ref) > 1e-2, field


@pytest.mark.parametrize("family", GRANITE)
def test_fp16_container_matches_transformers_on_rounded_weights(family, tiny_dir, tiny_emoe):
    with edgemoe.load(tiny_emoe(family, 16), engine="c") as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_logits(tiny_dir(family), IDS, round_fp16=True)) <= 1e-4


@pytest.mark.parametrize("family", GRANITE)
def test_transformers5_fused_names_read_like_the_original_names(family, tiny_dir, tiny_emoe):
    # save_original_format=False: experts.gate_up_proj / experts.down_proj / router.weight instead of
    # input_linear / output_linear / router.layer (the shared MLP keeps its names in both)
    d = tiny_dir(family, "fused")
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "np") as f:
        assert "model.layers.0.block_sparse_moe.experts.gate_up_proj" in set(f.keys())
    with edgemoe.load(tiny_emoe(family, 32, "fused"), engine="c") as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_logits(d, IDS)) <= 1e-5


@pytest.fixture(scope="module")
def mwq_emoe(tiny_dir, tmp_path_factory):
    """family -> an MWQ-4 container (2-bit base plane + 2 residual planes, calibrated through the C engine) with
    int8 dense weights."""
    from edgemoe_export import export

    root = tmp_path_factory.mktemp("granite_mwq")
    (root / "calib.txt").write_text(CALIB)
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = export(tiny_dir(family), root / f"{family}.emoe", bits=4, calib=root / "calib.txt",
                                   calib_tokens=512, show_progress=False)
        return cache[family]

    return get


def _hf_with_container_weights(model_dir, s, array):
    """The transformers model with every weight replaced by the container's (dequantized) values, array(name)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sd = {"model.embed_tokens.weight": array("token_embd.weight"), "model.norm.weight": array("output_norm.weight")}
    if not s.tie_embeddings:
        sd["lm_head.weight"] = array("output.weight")
    for i in range(s.n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        sd.update({p + "input_layernorm.weight": array(b + "attn_norm.weight"),
                   p + "post_attention_layernorm.weight": array(b + "ffn_norm.weight"),
                   p + "block_sparse_moe.router.weight": array(b + "ffn_gate_inp.weight")})
        for hf, ours in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")):
            sd[p + f"self_attn.{hf}_proj.weight"] = array(b + f"attn_{ours}.weight")
        e = [[array(f"{b}expert.{x}.ffn_{m}.weight") for m in ("gate", "up", "down")] for x in range(s.n_experts)]
        sd[p + "block_sparse_moe.experts.gate_up_proj"] = np.stack([np.concatenate(g[:2]) for g in e])
        sd[p + "block_sparse_moe.experts.down_proj"] = np.stack([g[2] for g in e])
        if s.shared_ffn:
            sd[p + "shared_mlp.input_linear.weight"] = np.concatenate(
                [array(b + "ffn_gate_shexp.weight"), array(b + "ffn_up_shexp.weight")])
            sd[p + "shared_mlp.output_linear.weight"] = array(b + "ffn_down_shexp.weight")
    missing, unexpected = model.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in sd.items()},
                                                strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("family", GRANITE)
def test_quantized_container_matches_transformers_on_its_own_weights(family, tiny_dir, mwq_emoe):
    # MWQ-4 experts and int8 dense weights: transformers holding the container's dequantized weights is the oracle.
    # The NumPy engine and the C engine with f32 activations (q8_f32_act) compute exactly those weights: only
    # summation order remains. The C default quantizes activations to int8 per block of 32 (like llama.cpp): the
    # house's bound for that is a median per-token error <= 5e-2 (test_native_mwq; olmoe measures the same here).
    import torch

    from edgemoe.engine_c import CEngine

    path = mwq_emoe(family)
    with edgemoe.load(path, engine="numpy") as m:
        model = _hf_with_container_weights(tiny_dir(family), m.spec, m._engine.weight)
        with torch.no_grad():
            ref = model(torch.tensor(IDS)[None]).logits[0].numpy()
        assert rel_err(m.logits(IDS), ref) <= 1e-5
    assert rel_err(ref, hf_logits(tiny_dir(family), IDS)) > 1e-3  # the quantization is really there
    with edgemoe.load(path, engine="c") as m:
        default = m.logits(IDS)
        c = m.container
        tensors = {n: c.array(n) for n, t in c.tensors.items() if t.kind != "blob"}
        quant = {n: {**t.quant, "n_planes": t.n_planes, "plane_offsets": [p["offset"] - t.offset for p in t.planes]}
                 for n, t in c.tensors.items() if t.planes}
        with CEngine(m.spec, tensors, {n: t.dtype for n, t in c.tensors.items()}, planes=c.planes, quant=quant,
                     max_ctx=64, q8_f32_act=True) as exact:
            assert rel_err(exact.logits(IDS), ref) <= 1e-5
    per_token = np.abs(default - ref).max(axis=1) / np.abs(ref).max()
    assert np.median(per_token) <= 5e-2


@pytest.mark.parametrize("family", GRANITE)
def test_decode_equals_prefill_bit_for_bit(family, tiny_emoe):
    with edgemoe.load(tiny_emoe(family, 32), engine="c") as m:
        eng = m._engine
        pre = eng.logits(IDS)
        eng.reset()
        assert np.array_equal(eng.prefill(IDS[:5]), pre[4])
        for t in range(5, len(IDS)):
            assert np.array_equal(eng.decode(int(IDS[t])), pre[t]), t


def _greedy(engine, ids, n):
    logits = engine.prefill(ids)
    toks, outs = [], [logits.copy()]
    for _ in range(n):
        toks.append(int(np.argmax(logits)))
        logits = engine.decode(toks[-1])
        outs.append(logits.copy())
    return toks, outs


def _minimum_budget(path, max_ctx, threads):
    with pytest.raises(N.BudgetError) as e:
        edgemoe.load(path, memory_budget=1, max_ctx=max_ctx, threads=threads)
    return int(str(e.value).split("below the minimum ")[1].split("(")[1].split(" bytes")[0])


@pytest.mark.parametrize("bits", [32, 4])
@pytest.mark.parametrize("family", GRANITE)
def test_budgeted_is_bit_identical_to_resident(family, bits, tiny_emoe, mwq_emoe):
    path = tiny_emoe(family, 32) if bits == 32 else mwq_emoe(family)
    ids = np.random.default_rng(3).integers(3, 320, 70).tolist()  # > one 64-token block
    with edgemoe.load(path, max_ctx=128, threads=2) as ref:
        toks_ref, logits_ref = _greedy(ref._engine, ids, 10)
    with edgemoe.load(path, memory_budget=_minimum_budget(path, 128, 2), max_ctx=128, threads=2) as m:
        assert m.engine_name == "c-stream"
        toks, logits = _greedy(m._engine, ids, 10)
        st = m.stats
    assert toks == toks_ref
    for a, b in zip(logits, logits_ref):
        np.testing.assert_array_equal(a, b)
    assert st["evictions"] > 0 and st["bytes_read_per_token"] > 0


@pytest.mark.parametrize("family", GRANITE)
def test_python_and_c_tensor_tables_agree(family, tiny_emoe):
    from edgemoe.arch import model_tensors

    path = tiny_emoe(family, 32)
    spec = open_container(path, verify=False).spec
    h = N.open_resident(path, 8, False, 1)
    try:
        assert h.tensors() == model_tensors(spec)
    finally:
        h.close()


def test_the_scalings_are_validated_by_the_core():
    from edgemoe.arch import ArchSpec
    from edgemoe.errors import InvalidFileError

    base = ArchSpec("granitemoe", n_layers=1, hidden=8, vocab=4, n_heads=2, n_kv_heads=1, head_dim=4, n_experts=3,
                    top_k=2, expert_ffn=4).to_json()
    assert ArchSpec.from_json(base).attn_scale == 0.0  # 0 = 1/sqrt(head_dim), the default
    for field in SCALES:
        with pytest.raises(InvalidFileError, match=f"'{field}' = -0.5 must be a positive number"):
            ArchSpec.from_json({**base, field: -0.5})
    for field in ("embed_scale", "residual_scale", "logit_divisor"):  # 0 is not a default for these
        with pytest.raises(InvalidFileError, match=f"'{field}' = 0 must be a positive number"):
            ArchSpec.from_json({**base, field: 0.0})


def test_unsupported_granite_options_are_refused(tiny_dir, tmp_path):
    import json
    import shutil

    from edgemoe_export import export

    from edgemoe.errors import EdgeMoEError

    for key, value, msg in (("hidden_act", "gelu", "hidden_act='gelu'"), ("attention_bias", True, "attention_bias"),
                            ("residual_multiplier", 0.0, "residual_multiplier = 0.0")):
        d = tmp_path / key
        shutil.copytree(tiny_dir("granitemoe"), d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(EdgeMoEError, match=msg):
            export(d, tmp_path / f"{key}.emoe", bits=32, show_progress=False)


@pytest.mark.parametrize("family", GRANITE)
def test_merged_experts_keep_the_shared_mlp_and_run_budgeted_bit_identical(family, tiny_dir, tiny_emoe, tmp_path):
    # MC-SMoE merge to 60% of the experts: the shared MLP and the scalings pass through unchanged; the C engine
    # equals the NumPy reference on the merged container; the budget changes nothing, bit for bit.
    from edgemoe_export.merge_stage import export_merged

    (tmp_path / "calib.txt").write_text(CALIB)
    path = export_merged(tiny_dir(family), tmp_path / "m.emoe", merge_ratio=0.6, calib_path=tmp_path / "calib.txt",
                         calib_tokens=512, seq_len=64, bits=32, show_progress=False)
    merged, plain = open_container(path), open_container(tiny_emoe(family, 32))
    s = merged.spec
    assert sum(s.stored_experts(layer) for layer in range(s.n_layers)) < s.n_experts * s.n_layers
    assert (s.embed_scale, s.attn_scale, s.residual_scale, s.logit_divisor) == (
        plain.spec.embed_scale, plain.spec.attn_scale, plain.spec.residual_scale, plain.spec.logit_divisor)
    for name in (n for n in plain.tensors if "shexp" in n):
        np.testing.assert_array_equal(merged.array(name), plain.array(name))
    assert any("shexp" in n for n in merged.tensors) == (family == "granitemoeshared")
    with edgemoe.load(path, engine="numpy") as m:
        ref = m.logits(IDS)
    with edgemoe.load(path, engine="c") as m:
        assert rel_err(m.logits(IDS), ref) <= 1e-5
    ids = IDS.tolist()
    with edgemoe.load(path, max_ctx=64, threads=2) as m:
        toks_ref, logits_ref = _greedy(m._engine, ids, 6)
    with edgemoe.load(path, memory_budget=_minimum_budget(path, 64, 2), max_ctx=64, threads=2) as m:
        toks, logits = _greedy(m._engine, ids, 6)
    assert toks == toks_ref and all(np.array_equal(a, b) for a, b in zip(logits, logits_ref))


# ---------------------------------------------------------------------------------------------------------------
# GGUF: llama.cpp's `granitemoe` (both variants), through the pinned llama-cpp-python


@pytest.fixture(scope="module")
def granite_gguf(tiny_dir, tmp_path_factory):
    importlib.import_module("llama_cpp")
    from edgemoe_export.gguf_export import export_gguf

    root = tmp_path_factory.mktemp("granite_gguf")
    cache = {}

    def get(family, gguf_type="F32"):
        if (family, gguf_type) not in cache:
            cache[family, gguf_type] = export_gguf(tiny_dir(family), root / f"{family}_{gguf_type}.gguf", gguf_type,
                                                   show_progress=False)
        return cache[family, gguf_type]

    return get


@pytest.mark.parametrize("family", GRANITE)
def test_gguf_f32_in_llama_cpp_matches_transformers_and_greedy_tokens_match_edgemoe(family, tiny_dir, tiny_emoe,
                                                                                       granite_gguf):
    from edgemoe_export.gguf_reader import open_gguf
    from llama_cpp import Llama

    path = granite_gguf(family)
    meta = open_gguf(path).config  # the multipliers are written under llama.cpp's names
    assert meta["residual_multiplier"] == pytest.approx(0.6) and meta["logits_scaling"] == pytest.approx(2.5)
    llm = Llama(model_path=str(path), n_ctx=256, n_batch=128, n_threads=2, n_threads_batch=2, logits_all=True,
                type_k=0, type_v=0, verbose=False)  # fp32 KV cache
    try:
        llm.eval(IDS.tolist())
        got = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
        ref = hf_logits(tiny_dir(family), IDS)
        assert rel_err(got, ref) <= 1e-5 and (got.argmax(-1) == ref.argmax(-1)).all()
        prompt = IDS[:6].tolist()  # 16 greedy steps, each engine feeding back its own token
        with edgemoe.load(tiny_emoe(family, 32), engine="c", threads=2) as m:
            logits = m._engine.prefill(prompt)
            llm.reset()
            llm.eval(prompt)
            ours, theirs = [], []
            for _ in range(16):
                theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                ours.append(int(np.argmax(logits)))
                logits = m._engine.decode(ours[-1])
                llm.eval([theirs[-1]])
        assert ours == theirs
    finally:
        llm.close()


@pytest.mark.parametrize("family", GRANITE)
def test_gguf_f16_in_llama_cpp_matches_transformers_on_rounded_weights(family, tiny_dir, granite_gguf):
    # ggml's F16 matmul also rounds the activations to f16: test_gguf's F16 bound (5e-3) applies. (Q8_0 / Q4_0 GGUFs
    # crash inside the pinned llama-cpp-python's eval on this machine, olmoe's as well; see BENCHMARKS.md.)
    from llama_cpp import Llama

    llm = Llama(model_path=str(granite_gguf(family, "F16")), n_ctx=256, n_batch=128, n_threads=2, n_threads_batch=2,
                logits_all=True, type_k=0, type_v=0, verbose=False)
    try:
        llm.eval(IDS.tolist())
        got = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    finally:
        llm.close()
    assert rel_err(got, hf_logits(tiny_dir(family), IDS, round_fp16=True)) <= 5e-3


@pytest.mark.parametrize("family", GRANITE)
def test_gguf_reads_back_to_the_same_model(family, tiny_dir, tiny_emoe, granite_gguf, tmp_path):
    # GGUF -> container: the same description (multipliers from llama.cpp's keys, q/k rows un-permuted) and logits
    from edgemoe_export import export

    path = export(granite_gguf(family), tmp_path / "from_gguf.emoe", bits=32, show_progress=False)
    a, b = open_container(path).spec, open_container(tiny_emoe(family, 32)).spec
    for field in ("embed_scale", "attn_scale", "residual_scale", "logit_divisor", "shared_ffn", "n_experts", "top_k",
                  "norm_topk", "rope_kind", "rope_theta"):
        assert getattr(a, field) == pytest.approx(getattr(b, field)), field
    with edgemoe.load(path, engine="c") as m:
        assert rel_err(m.logits(IDS), hf_logits(tiny_dir(family), IDS)) <= 1e-5


def test_gguf_export_refuses_scalings_other_architectures_cannot_express():
    from edgemoe_export.gguf_export import _check_supported

    from edgemoe.arch import ArchSpec
    from edgemoe.errors import EdgeMoEError

    mixtral_like = ArchSpec("mixtral", n_layers=1, hidden=8, vocab=4, n_heads=2, n_kv_heads=1, head_dim=4,
                            n_experts=3, top_k=2, expert_ffn=4, norm_topk=True, residual_scale=0.5)
    with pytest.raises(EdgeMoEError, match="scalings are not supported by llama.cpp's 'llama'"):
        _check_supported(mixtral_like, "llama")


# ---------------------------------------------------------------------------------------------------------------
# ONNX (onnxruntime CPU): the multipliers as Mul / Div nodes, the experts through com.microsoft.MoE


@pytest.mark.parametrize("family", GRANITE)
def test_onnx_fp32_prefill_and_decode_match_transformers(family, tiny_dir, tmp_path):
    importlib.import_module("onnxruntime")
    from edgemoe_export.onnx_export import export_onnx
    from tiny_models_onnx import ort_greedy, ort_session

    path = export_onnx(tiny_dir(family), tmp_path / "onnx", "fp32", show_progress=False)
    prompt = IDS[:8].tolist()
    ids, got = ort_greedy(ort_session(path), prompt, 16)  # 16 decode steps through the KV cache
    ref = hf_logits(tiny_dir(family), ids)
    assert rel_err(got, ref) <= 1e-5
    assert ids[len(prompt):] == [int(t) for t in ref[len(prompt) - 1: -1].argmax(-1)]
