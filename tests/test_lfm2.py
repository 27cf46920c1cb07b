"""LFM2-MoE (`lfm2_moe`): a tiny transformers 5 checkpoint -> export -> edgemoe, against transformers and itself.

The tiny model (tiny_lfm2.py) mixes short-convolution and attention layers; the conv layers' rolling state is checked
where it can go wrong: prefill (blocks of 64 tokens) against token-by-token decode, several sequences in one batch,
the budgeted engine, a reset, and a truncation it cannot honour."""

import dataclasses
import importlib

import numpy as np
import pytest
from conftest import hf_logits, rel_err
from family_exports import CALIB, IDS, family_exports
from greedy_tokens import greedy_tokens

import edgemoe
from edgemoe.arch import model_tensors
from edgemoe.container import open_container
from edgemoe.errors import FormatError, UnsupportedModelError
from edgemoe.reference import reference_logits

N = importlib.import_module("edgemoe._native")
importlib.import_module("edgemoe_export")


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory):
    """(bits) -> container; .dir is the HF checkpoint."""
    from tiny_lfm2 import build_tiny_lfm2

    return family_exports(tmp_path_factory, "lfm2", build_tiny_lfm2)


@pytest.fixture(scope="module")
def hf_ref(lfm2):
    return hf_logits(lfm2.dir, IDS)


def test_reader_describes_every_lfm2_option(lfm2):
    s = open_container(lfm2(32), verify=False).spec
    assert (s.family, s.n_experts, s.top_k, s.expert_ffn, s.head_dim, s.dense_ffn) == ("lfm2moe", 7, 3, 32, 24, 96)
    assert s.conv_layers == [0, 2, 3, 5] and s.conv_kernel == 3 and s.dense_layers == [0, 1]
    assert s.qk_norm == "head" and s.router_fn == "sigmoid" and s.score_bias and s.norm_topk
    assert s.norm_topk_eps == 1e-6 and s.routed_scaling == 1.5 and s.tie_embeddings and s.norm_eps == 1e-5


@pytest.mark.parametrize("engine", ["numpy", "c"])
def test_lfm2_fp32_logits_match_transformers(lfm2, hf_ref, engine):
    with edgemoe.load(lfm2(32), engine=engine, threads=2) as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_ref) <= 1e-5


@pytest.mark.parametrize("drop", [{"score_bias": False}, {"routed_scaling": 1.0}, {"conv_kernel": 1}])
def test_every_lfm2_option_changes_the_logits(lfm2, hf_ref, drop):
    c = open_container(lfm2(32), verify=False)
    spec = dataclasses.replace(c.spec, **drop)
    w = c.array if "conv_kernel" not in drop else (lambda n: c.array(n)[:, -1:] if "shortconv.conv" in n else c.array(n))
    assert rel_err(reference_logits(spec, w, IDS), hf_ref) > 1e-3
    assert rel_err(reference_logits(c.spec, c.array, IDS), hf_ref) <= 1e-5


def test_python_and_c_tensor_tables_agree(lfm2):
    path = lfm2(32)
    spec = open_container(path, verify=False).spec
    py = model_tensors(spec)
    names = [n for n, _, _ in py]
    assert ("blk.0.shortconv.conv.weight", (64, 3), True) in py and ("blk.0.shortconv.in_proj.weight", (192, 64), True) in py
    assert "blk.0.attn_q.weight" not in names and "blk.1.attn_q_norm.weight" in names
    h = N.open_resident(path, 8, False, 1)
    try:
        assert h.tensors() == py
    finally:
        h.close()


def test_prefill_equals_token_by_token_decode_across_blocks(lfm2):
    ids = np.random.default_rng(1).integers(3, 320, 70)  # > one 64-token block: the conv state crosses a block
    with edgemoe.load(lfm2(32), engine="c", threads=2, max_ctx=128) as m:
        full = m.logits(ids)
        eng = m._engine
        eng.reset()
        steps = [eng.prefill(ids[:1].tolist())] + [eng.decode(int(t)) for t in ids[1:]]
    np.testing.assert_array_equal(np.stack(steps), full)


def test_batch_decode_of_several_sequences_equals_their_own_decodes(lfm2):
    a, b = IDS[:10].tolist(), IDS[10:17].tolist()
    with edgemoe.load(lfm2(32), engine="c", threads=2) as m:
        eng = m._engine
        eng.set_n_seq(2)
        eng.prefill(a, seq=0), eng.prefill(b, seq=1)
        batch = eng.decode_batch([5, 9], [0, 1])
        eng.reset(0), eng.reset(1)
        eng.prefill(a, seq=0), eng.prefill(b, seq=1)
        one = [eng.decode(5, seq=0), eng.decode(9, seq=1)]
    np.testing.assert_array_equal(batch, np.stack(one))


def test_reset_clears_the_conv_state_and_truncation_keeps_all_or_none(lfm2):
    with edgemoe.load(lfm2(32), engine="c", threads=2) as m:
        eng = m._engine
        fresh = eng.prefill(IDS[:6].tolist())
        eng.prefill(IDS[6:20].tolist())
        eng.reset()
        again = eng.extend(IDS[:6].tolist())  # extend after a reset: no prefill's own reset involved
        np.testing.assert_array_equal(again, fresh)
        eng.extend(IDS[6:12].tolist())
        with pytest.raises(N.NativeError, match="conv layers"):
            eng.truncate(6)
        eng.truncate(0)
        np.testing.assert_array_equal(eng.extend(IDS[:6].tolist()), fresh)
        # generate reuses a cached prefix where it can: with conv layers it restarts instead, same tokens
        first = m.generate(IDS[:8].tolist(), max_new_tokens=4, temperature=0)
        assert m.generate(IDS[:8].tolist(), max_new_tokens=4, temperature=0) == first
        m.generate(IDS[:12].tolist(), max_new_tokens=2, temperature=0)
        assert m.generate(IDS[:8].tolist(), max_new_tokens=4, temperature=0) == first


@pytest.mark.parametrize("n_keep", [0, 3])
def test_context_shift_reruns_a_conv_model_exactly_as_a_fresh_run(lfm2, n_keep):
    """A context shift keeps n_keep tokens and drops older ones: a conv layer's state cannot be rewound, so the
    shifted context is run again from its start, and each next token is a fresh prefill's argmax."""
    from test_finish_and_shift import _fresh_shifted_greedy

    prompt = IDS[:10].tolist()
    with edgemoe.load(lfm2(32), engine="c", threads=2, max_ctx=16) as m:
        r = m.generate(prompt, max_new_tokens=30, stop_at_eos=False, context_shift=True, n_keep=n_keep,
                       return_info=True)
        want, shifts = _fresh_shifted_greedy(m._engine, prompt, 30, 16, n_keep)
        assert shifts >= 3 and r.context_shifts == shifts and r.completion_tokens == 30
        assert r.text == m.tokenizer.decode(want)


@pytest.mark.parametrize("bits", [32, 4])
def test_budgeted_run_is_bit_identical_to_resident(lfm2, bits):
    from test_budget import greedy_logits, minimum_budget

    path = lfm2(bits)
    ids = np.random.default_rng(3).integers(3, 320, 70).tolist()  # > one 64-token block
    with edgemoe.load(path, max_ctx=128, threads=2) as ref:
        toks_ref, logits_ref = greedy_logits(ref._engine, ids, 10)
    budget = minimum_budget(path, 128, threads=2)
    with edgemoe.load(path, memory_budget=budget, max_ctx=128, threads=2) as m:
        assert m.engine_name == "c-stream"
        toks, logits = greedy_logits(m._engine, ids, 10)
        assert m.stats["evictions"] > 0
    assert toks == toks_ref
    for x, y in zip(logits, logits_ref):
        np.testing.assert_array_equal(x, y)


def test_the_budget_counts_the_conv_state_and_only_attention_layers_kv(lfm2):
    """The plan's kv_bytes: 2 attention layers' K and V (f32, 128 positions of 2 heads x 24) + the 4 conv layers'
    state (conv_kernel - 1 = 2 rows of hidden 64, f32)."""
    with pytest.raises(N.BudgetError) as e:
        edgemoe.load(lfm2(32), memory_budget=1, max_ctx=128, threads=1)
    assert e.value.plan["kv_bytes"] == 2 * 2 * 128 * (2 * 24) * 4 + 4 * 2 * 64 * 4


# MWQ experts on Q8 activations. The default export also stores the dense matrices Q8_0 and runs them on Q8
# activations: a conv layer multiplies two of its projections (B * x, then C * conv), so that rounding shows more
# than in attention-only families (measured: 8-bit max error 0.12 with Q8_0 dense matrices, 0.011 with f32 ones).
@pytest.mark.parametrize("bits,tol", [(16, 5e-3), (4, 0.3)])
def test_quantized_containers_stay_near_transformers(lfm2, hf_ref, bits, tol):
    with edgemoe.load(lfm2(bits), engine="c", threads=2) as m:
        err = rel_err(m.logits(IDS), hf_ref)
    assert err <= tol


def test_mwq8_stays_near_transformers(lfm2, hf_ref, tmp_path):
    from edgemoe_export import export

    with edgemoe.load(lfm2(8), engine="c", threads=2) as m:
        ours = m.logits(IDS)
    per_token = np.abs(ours - hf_ref).max(1) / np.abs(hf_ref).max()
    assert np.median(per_token) <= 5e-2 and (ours.argmax(1) == hf_ref.argmax(1)).mean() >= 0.9
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    path = export(lfm2.dir, tmp_path / "l8d32.emoe", bits=8, dense_bits=32, calib=calib, calib_tokens=512,
                  show_progress=False)
    with edgemoe.load(path, engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), hf_ref) <= 2e-2


@pytest.mark.parametrize("method", ["mcsmoe", "average", "prune"])
def test_merged_containers_run_alike_in_c_and_numpy(lfm2, tmp_path, method):
    """MC-SMoE and its baselines merge LFM2's experts (calibrated through the conv layers, routed with the expert
    bias); the C engine runs the merged container like the reference."""
    from edgemoe_export.merge_stage import export_merged

    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    path = export_merged(lfm2.dir, tmp_path / "m.emoe", merge_ratio=0.6, method=method, bits=32, calib_path=calib,
                         calib_tokens=512, show_progress=False)
    outs = []
    for engine in ("c", "numpy"):
        with edgemoe.load(path, engine=engine, threads=2) as m:
            assert max(max(row) for row in m.spec.expert_map if row) < 6  # merged: fewer stored experts than 7
            outs.append(m.logits(IDS))
    assert rel_err(outs[0], outs[1]) <= 1e-5


def test_c_engine_equals_numpy_engine_on_the_f16_container(lfm2):
    outs = []
    for engine in ("c", "numpy"):
        with edgemoe.load(lfm2(16), engine=engine, threads=2) as m:
            outs.append(m.logits(IDS))
    assert rel_err(outs[0], outs[1]) <= 1e-5


def test_unsupported_lfm2_variants_are_refused():
    from edgemoe_export.families import lfm2moe_spec
    from tiny_lfm2 import CONFIG

    base = {**CONFIG, "model_type": "lfm2_moe"}
    with pytest.raises(UnsupportedModelError, match="conv_bias"):
        lfm2moe_spec({**base, "conv_bias": True})
    with pytest.raises(UnsupportedModelError, match="sliding_attention"):
        lfm2moe_spec({**base, "layer_types": ["conv"] * 5 + ["sliding_attention"]})
    with pytest.raises(FormatError, match="layer_types"):
        lfm2moe_spec({**base, "layer_types": None})
    assert lfm2moe_spec(base).conv_layers == [0, 2, 3, 5]


# --- GGUF: llama.cpp's `lfm2moe`; ONNX: refused ------------------------------------------------------------------

# llama.cpp's lfm2moe sizes attn_q / attn_output as n_embd x n_embd (head_dim = hidden / heads) and does not apply a
# routed scaling: its variant of the tiny model has those. (Its renormalization clamps the top-k sum at 6.1e-5 instead
# of adding 1e-6: the same on these weights, within 1e-5.)
GGUF_VARIANT = {"head_dim": 16, "routed_scaling_factor": 1.0}


@pytest.fixture(scope="module")
def gguf_ckpt(tmp_path_factory):
    from tiny_lfm2 import build_tiny_lfm2

    return build_tiny_lfm2(tmp_path_factory.mktemp("lfm2_gguf") / "ckpt", **GGUF_VARIANT)


def test_gguf_f32_runs_in_llama_cpp_like_transformers(gguf_ckpt, tmp_path):
    importlib.import_module("llama_cpp")
    from edgemoe_export.gguf_export import export_gguf
    from test_gguf import llama_logits

    path = export_gguf(gguf_ckpt, tmp_path / "g.gguf", "F32", show_progress=False)
    got, ref = llama_logits(path, IDS), hf_logits(gguf_ckpt, IDS)
    assert rel_err(got, ref) <= 1e-5
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("gtype", ["F16", "Q8_0"])
def test_quantized_gguf_runs_in_llama_cpp_with_f32_conv_taps(gguf_ckpt, tmp_path, gtype):
    """llama.cpp's ssm_conv asserts on non-F32 taps (a crash, not an error): F16 and Q8_0 files keep them F32."""
    importlib.import_module("llama_cpp")
    from edgemoe_export.gguf_export import export_gguf
    from edgemoe_export.gguf_parse import parse_gguf
    from test_gguf import TOL, llama_logits

    path = export_gguf(gguf_ckpt, tmp_path / "g.gguf", gtype, show_progress=False)
    types = {t.name: t.tensor_type.name for t in parse_gguf(path).tensors}
    assert types["blk.0.shortconv.conv.weight"] == "F32" and types["blk.0.shortconv.in_proj.weight"] == gtype
    got, ref = llama_logits(path, IDS), hf_logits(gguf_ckpt, IDS)
    if gtype == "F16":
        assert rel_err(got, ref) <= TOL[gtype]
    else:  # Q8_0 matrices on Q8 activations: the conv's products of projections show it (as in edgemoe's own Q8_0:
        # test_mwq8_stays_near_transformers); measured: max 0.13, per-token median 0.039, argmax 21 of 24 tokens
        per_token = np.abs(got - ref).max(1) / np.abs(ref).max()
        assert np.median(per_token) <= 5e-2 and (got.argmax(1) == ref.argmax(1)).mean() >= 0.8


def test_gguf_greedy_tokens_match_edgemoe(gguf_ckpt, tmp_path):
    importlib.import_module("llama_cpp")
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf
    from test_gguf import _llama

    path = export_gguf(gguf_ckpt, tmp_path / "g.gguf", "F32", show_progress=False)
    emoe = export(gguf_ckpt, tmp_path / "g.emoe", bits=32, show_progress=False)
    ours, theirs = greedy_tokens(emoe, path, [int(t) for t in IDS[:8]], 12, _llama)
    assert theirs == ours


def test_gguf_import_reads_llama_cpp_lfm2moe_back(gguf_ckpt, tmp_path):
    """GGUF -> edgemoe: conv layers come back from the per-layer KV head counts (0), the taps from shortconv.l_cache,
    the dense layers from leading_dense_block_count, the final norm from token_embd_norm."""
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf

    g = export_gguf(gguf_ckpt, tmp_path / "g.gguf", "F32", show_progress=False)
    path = export(g, tmp_path / "from_gguf.emoe", bits=32, show_progress=False)
    spec = open_container(path, verify=False).spec
    assert (spec.family, spec.conv_layers, spec.conv_kernel, spec.dense_layers) == ("lfm2moe", [0, 2, 3, 5], 3, [0, 1])
    with edgemoe.load(path, engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), hf_logits(gguf_ckpt, IDS)) <= 1e-5


def test_gguf_refuses_what_llama_cpp_cannot_express(lfm2, tmp_path):
    from edgemoe_export.gguf_export import export_gguf

    from edgemoe.errors import EdgeMoEError

    with pytest.raises(EdgeMoEError, match="n_embd x n_embd"):  # the default tiny model: head_dim 24 * 4 != 64
        export_gguf(lfm2.dir, tmp_path / "x.gguf", "F32", show_progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_onnx_export_refuses_conv_layers_by_name(lfm2, tmp_path):
    importlib.import_module("onnx")
    from edgemoe_export.onnx_export import export_onnx

    from edgemoe.errors import EdgeMoEError

    with pytest.raises(EdgeMoEError, match="short-convolution"):
        export_onnx(lfm2.dir, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists() or not any((tmp_path / "onnx").iterdir())


def test_export_help_lists_every_family_the_exporter_reads():
    import re

    from edgemoe_export.families import FAMILIES

    from edgemoe.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd" or getattr(a, "choices", None))
    text = " ".join(sub.choices["export"].description.split())
    families = re.search(r"Families \(config.json model_type\): (.+?\))\.", text).group(1)
    listed = {t for group in re.findall(r"\(([^)]+)\)", families) for t in group.split(", ")}
    assert listed == set(FAMILIES)
