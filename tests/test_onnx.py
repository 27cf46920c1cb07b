"""ONNX export: onnxruntime (CPU EP) is the engine, transformers / the edgemoe NumPy reference the oracle.

- fp32: prefill 8 tokens, then 16 greedy decode steps through the KV cache (onnxruntime-genai's input/output
  layout); every position's logits == transformers on the whole final sequence (relative error <= 1e-4: both sides
  compute in fp32, measured 4e-7..1.3e-6; fp16 anywhere would give ~1e-3). OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral
  (tiny_models.py: GQA, QKV bias, shared expert, head_dim != hidden / heads); SmallThinker (not in transformers)
  against the edgemoe NumPy engine, including a sliding window shorter than the sequence; a left-padded batch; the
  standard-ops expert path; merged and pruned experts from an edgemoe container; GGUF as the source.
- int8 / int4 (NNCF on the dense MatMuls, QMoE-packed experts): `onnx.checker` clean, loads and runs, and equals
  the fp32 graph running the same dequantized weights (so the quantized graph computes exactly what it stores);
  the quantization error itself is reported (relative error and KL vs fp32) and bounded loosely (see INT_BOUNDS).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_logits, rel_err
from tiny_models_onnx import (
    empty_past,
    kl_div,
    ort_greedy,
    ort_logits,
    ort_session,
    ort_step,
    source_weights,
    well_conditioned_ids,
    write_merged_container,
)
from tiny_smallthinker import build_tiny_smallthinker

onnx = importlib.import_module("onnx")
ort = importlib.import_module("onnxruntime")

from edgemoe_export.onnx_export import export_onnx

import edgemoe
from edgemoe.errors import EdgeMoEError

TOL = 1e-4
HF_FAMILIES = ("olmoe", "qwen2moe", "qwen3moe", "mixtral")
PROMPT = [int(i) for i in np.random.default_rng(0).integers(3, 312, size=8)]
STEPS = 16


@pytest.fixture(scope="session")
def st_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("st_onnx")
    cache = {}

    def get(variant: str, **overrides) -> Path:
        key = (variant, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_tiny_smallthinker(root / f"{variant}_{len(cache)}", variant, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def onnx_model(tiny_dir, st_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(name: str, weights: str = "fp32", moe_op: str = "auto") -> Path:
        key = (name, weights, moe_op)
        if key not in cache:
            src = st_dir(name.split("_", 1)[1]) if name.startswith("smallthinker_") else tiny_dir(name)
            cache[key] = export_onnx(src, root / f"{name}_{weights}_{moe_op}", weights, moe_op=moe_op,
                                     show_progress=False)
        return cache[key]

    return get


def _check_generation(model_path: Path, reference) -> tuple[float, float]:
    """Greedy-generate through the KV cache; compare every position with reference(ids) on the final sequence."""
    ids, got = ort_greedy(ort_session(model_path), PROMPT, STEPS)
    ref = reference(ids)  # ids: prompt + 16 generated tokens, each fed back through the cache
    assert got.shape == ref.shape == (len(PROMPT) + STEPS, ref.shape[1])
    err_prefill = rel_err(got[: len(PROMPT)], ref[: len(PROMPT)])
    err_decode = rel_err(got[len(PROMPT):], ref[len(PROMPT):])
    assert err_prefill <= TOL and err_decode <= TOL, (err_prefill, err_decode)
    assert ids[len(PROMPT):] == [int(t) for t in ref[len(PROMPT) - 1: -1].argmax(-1)]  # greedy == reference argmax
    return err_prefill, err_decode


# ---------------------------------------------------------------------------------------------------------------
# fp32 == transformers / edgemoe


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_fp32_prefill_and_decode_match_transformers(family, onnx_model, tiny_dir):
    path = onnx_model(family)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "MoE" in ops and not ops & {"QMoE", "DequantizeLinear"}
    e1, e2 = _check_generation(path, lambda ids: hf_logits(tiny_dir(family), ids))
    print(f"{family} ONNX fp32 vs transformers: prefill {e1:.2e}, 16 decode steps {e2:.2e}")


@pytest.mark.parametrize("variant", ["sigmoid_tied", "softmax", "hybrid"])
def test_smallthinker_matches_edgemoe(variant, onnx_model, st_dir, tmp_path):
    from edgemoe_export import export

    emoe = export(st_dir(variant), tmp_path / "st.emoe", bits=32, show_progress=False)
    with edgemoe.load(emoe, engine="numpy") as m:
        e1, e2 = _check_generation(onnx_model(f"smallthinker_{variant}"), m.logits)
    print(f"smallthinker_{variant} ONNX fp32 vs edgemoe: prefill {e1:.2e}, decode {e2:.2e}")


def test_sliding_window_shorter_than_the_sequence(st_dir, tmp_path):
    """A window of 5 (llama.cpp cannot express it; ONNX can): prefill and decode cross the window edge."""
    from edgemoe_export import export

    src = st_dir("hybrid", sliding_window_size=5)
    emoe = export(src, tmp_path / "w.emoe", bits=32, show_progress=False)
    path = export_onnx(src, tmp_path / "w_onnx", show_progress=False)
    with edgemoe.load(emoe, engine="numpy") as m:
        assert m.spec.sliding_window == 5 and m.spec.swa_layers == [1, 2, 3]
        _check_generation(path, m.logits)
        # discriminating: without the window the reference differs
        ids, got = ort_greedy(ort_session(path), PROMPT, 4)
        m.spec.sliding_window = 0
        assert rel_err(got, m.logits(ids)) > 100 * TOL


@pytest.mark.parametrize("name", ["qwen2moe", "smallthinker_sigmoid_tied"])
def test_standard_ops_expert_path(name, onnx_model, tiny_dir, st_dir, tmp_path):
    path = onnx_model(name, moe_op="standard")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"MoE", "QMoE"} and {"TopK", "ScatterElements"} <= ops
    if name == "qwen2moe":
        ref = lambda ids: hf_logits(tiny_dir(name), ids)
    else:
        from edgemoe_export import export

        model = edgemoe.load(export(st_dir("sigmoid_tied"), tmp_path / "st.emoe", show_progress=False),
                             engine="numpy")
        ref = model.logits
    _check_generation(path, ref)


def test_left_padded_batch(onnx_model, tiny_dir):
    """Two sequences of different lengths in one batch (left padding, attention_mask 0, positions from 0 at the
    first real token), prefill + 4 decode steps: each row == transformers on that row alone."""
    sess = ort_session(onnx_model("qwen3moe"))
    a, b = PROMPT, PROMPT[:5]
    pad = len(a) - len(b)
    ids = np.array([a, [0] * pad + b])
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)])
    pos = np.array([list(range(len(a))), [0] * pad + list(range(len(b)))])
    logits, past = ort_step(sess, ids, mask, pos, empty_past(sess, 2))
    seqs = [list(a), list(b)]
    rows = [[logits[0]], [logits[1, pad:]]]
    for _ in range(4):
        nxt = [int(rows[0][-1][-1].argmax()), int(rows[1][-1][-1].argmax())]
        for s, t in zip(seqs, nxt):
            s.append(t)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = np.array([[len(seqs[0]) - 1], [len(seqs[1]) - 1]])
        logits, past = ort_step(sess, np.array(nxt)[:, None], mask, pos, past)
        rows[0].append(logits[0])
        rows[1].append(logits[1])
    for s, r in zip(seqs, rows):
        got = np.concatenate(r)
        assert rel_err(got, hf_logits(tiny_dir("qwen3moe"), s)) <= TOL


def test_merged_and_pruned_container(tiny_dir, tmp_path):
    """A merged container (expert_map with groups and a pruned expert): ONNX == edgemoe on the merged model.
    Pruned slots are masked in the router input (-1e30), groups are copied into their members' slots."""
    maps = [[0, 0, 1, -1, 2, 3, 3, 4], [0, 1, 1, 2, 3, 4, 5, -1]]  # qwen3moe: 8 experts, top-2, renormalized
    emoe = write_merged_container(tiny_dir("qwen3moe"), tmp_path / "merged.emoe", maps)
    path = export_onnx(emoe, tmp_path / "merged_onnx", show_progress=False)
    with edgemoe.load(emoe, engine="numpy") as m:
        assert m.spec.expert_map == maps
        _check_generation(path, m.logits)
        # discriminating: the unmerged model is far away
        ids, got = ort_greedy(ort_session(path), PROMPT, 2)
        assert rel_err(got, hf_logits(tiny_dir("qwen3moe"), ids)) > 100 * TOL


def test_gguf_source(tiny_dir, tmp_path):
    """GGUF (Mixtral: q/k rows permuted for llama.cpp) -> ONNX == transformers."""
    gguf = importlib.import_module("gguf")  # noqa: F841
    from edgemoe_export.gguf_export import export_gguf

    g = export_gguf(tiny_dir("mixtral"), tmp_path / "m.gguf", "F32", show_progress=False)
    path = export_onnx(g, tmp_path / "m_onnx", show_progress=False)
    _check_generation(path, lambda ids: hf_logits(tiny_dir("mixtral"), ids))


def test_external_data_and_tokenizer(tiny_dir, tmp_path):
    out = tmp_path / "ext"
    path = export_onnx(tiny_dir("olmoe"), out, external_data=True, show_progress=False)
    assert (out / "model.onnx.data").stat().st_size > 10 * (out / "model.onnx").stat().st_size  # weights moved out
    onnx.checker.check_model(str(path))
    ids = PROMPT
    assert rel_err(ort_logits(path, ids), hf_logits(tiny_dir("olmoe"), ids)) <= TOL
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    # re-export in place without external data: the stale data file goes away
    export_onnx(tiny_dir("olmoe"), out, external_data=False, show_progress=False)
    assert not (out / "model.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext"]  # no temporary directories left


# ---------------------------------------------------------------------------------------------------------------
# int8 / int4


def _dequantized_fp32_graph(qpath: Path, fpath: Path, out: Path) -> Path:
    """The fp32 graph with every weight replaced by what the quantized graph stores (DequantizeLinear initializers
    decoded with the ONNX formula, QMoE blocks decoded with QMoE's), for an exact comparison."""
    from onnx import numpy_helper as nh

    q, f = onnx.load(str(qpath)), onnx.load(str(fpath))
    qinit = {i.name: i for i in q.graph.initializer}
    finit = {i.name: i for i in f.graph.initializer}

    def arr(name):
        return nh.to_array(qinit[name])

    repl = {}
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in qinit:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            x = arr(n.input[0]).astype(np.float32)
            s = arr(n.input[1]).astype(np.float32)
            zp = arr(n.input[2]).astype(np.float32) if len(n.input) > 2 and n.input[2] else np.zeros_like(s)
            axis = attrs.get("axis", 1) % x.ndim
            if attrs.get("block_size"):
                s, zp = (np.repeat(t, attrs["block_size"], axis=axis) for t in (s, zp))
            elif s.ndim == 1:
                shape = [1] * x.ndim
                shape[axis] = -1
                s, zp = s.reshape(shape), zp.reshape(shape)
            name = n.input[0][: -len("_quantized")] if n.input[0].endswith("_quantized") else None
            target = name if name in finit else n.name[: -len("_DequantizeLinear")]
            assert target in finit, n.name
            repl[target] = ((x - zp) * s).astype(np.float32)
    qmoe = [n for n in q.graph.node if n.op_type == "QMoE"]
    moe = [n for n in f.graph.node if n.op_type == "MoE"]
    assert len(qmoe) == len(moe)
    for qn, fn in zip(qmoe, moe):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qn.attribute}
        bits, block = attrs["expert_weight_bits"], attrs.get("block_size", 0)
        for (wq, sc), target in (((qn.input[2], qn.input[3]), fn.input[2]), ((qn.input[5], qn.input[6]), fn.input[4])):
            codes, scales = arr(wq), arr(sc)
            if bits == 4:
                codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
            vals = codes.astype(np.float32) - 2 ** (bits - 1)
            scales = np.repeat(scales, block, axis=-1) if block else scales[..., None]
            repl[target] = (vals * scales).astype(np.float32)
    for name, a in repl.items():
        finit[name].CopyFrom(nh.from_array(a, name))
    onnx.save(f, str(out))
    return out


# The quantization error itself is measured on id sequences without routing near-ties (gap >= ROUTER_GAP between
# the k-th and (k+1)-th router logits): a smaller gap lets weight rounding flip an expert choice, which in these
# tiny random models (weights std 0.15, sharp attention) moves the logits by O(10%) -- a property of the model, not
# of the export. SmallThinker's router reads the raw layer input (embedding scale, not RMS-normed), so its logits
# and gaps are ~5x smaller. Bounds (relative error, mean KL in nats vs fp32) are ~3-4x the worst measured (int8:
# 1.7e-2..2.8e-2 / 1.8e-4..4.1e-4; int4: 0.26..0.38 / 0.03..0.06 -- random Gaussian weights have no slack for
# 4 bits, and the GGUF tests see the same for Q4_0): they catch a broken packing (a nibble-order or scale-layout
# error gives O(1) errors and KL > 1), not a percent of accuracy. Exactness is checked separately: the quantized
# graph == the fp32 graph running the weights it stores (<= 1e-4; measured ~3e-7), with int4 MatMulNBits at
# accuracy_level 0 (onnxruntime's default fuses DequantizeLinear(int4) + MatMul into MatMulNBits with int8
# activations, accuracy_level 4; both sessions are bounded).
ROUTER_GAP = {"smallthinker_sigmoid_tied": 0.02}
INT_BOUNDS = {"int8": (0.1, 2e-3), "int4": (1.0, 0.2)}
INT_CASES = [(f, w) for w in ("int8", "int4") for f in HF_FAMILIES + ("smallthinker_sigmoid_tied",)]


@pytest.mark.parametrize("name,weights", INT_CASES)
def test_int8_int4_graphs(name, weights, onnx_model, tiny_dir, st_dir, tmp_path):
    qpath, fpath = onnx_model(name, weights), onnx_model(name)
    model = onnx.load(str(qpath))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "QMoE" in ops and "MoE" not in ops and ops.count("DequantizeLinear") >= 4
    src = st_dir("sigmoid_tied") if name.startswith("smallthinker") else tiny_dir(name)
    spec, weights_f32 = source_weights(src)
    ids = well_conditioned_ids(spec, weights_f32, ROUTER_GAP.get(name, 0.05), length=8)
    got, fp32 = ort_logits(qpath, ids), ort_logits(fpath, ids)
    # exactness: the quantized graph == the fp32 graph on the weights it stores
    exact = ort_logits(qpath, ids, exact_int4=True)
    deq = _dequantized_fp32_graph(qpath, fpath, tmp_path / "deq.onnx")
    err_deq = rel_err(exact, ort_logits(deq, ids))
    err, kl = rel_err(got, fp32), kl_div(fp32, got)
    err0, kl0 = rel_err(exact, fp32), kl_div(fp32, exact)
    print(f"{name} ONNX {weights}: vs fp32 rel err {err:.2e}, KL {kl:.2e} nats (fp32 activations: {err0:.2e}, "
          f"{kl0:.2e}); quantized graph vs fp32 graph on its dequantized weights {err_deq:.2e}; "
          f"file {qpath.stat().st_size} B (fp32 {fpath.stat().st_size} B)")
    assert err_deq <= 1e-4, err_deq
    max_err, max_kl = INT_BOUNDS[weights]
    assert err <= max_err and kl <= max_kl, (err, kl)
    assert err0 <= max_err and kl0 <= max_kl, (err0, kl0)
    assert qpath.stat().st_size < (0.45 if weights == "int8" else 0.35) * fpath.stat().st_size


# ---------------------------------------------------------------------------------------------------------------
# refusals


def test_bad_arguments(tiny_dir, tmp_path):
    src = tiny_dir("qwen3moe")
    with pytest.raises(EdgeMoEError, match="expected one of fp32, int8, int4"):
        export_onnx(src, tmp_path / "x", "int2")
    with pytest.raises(EdgeMoEError, match="opset 17"):
        export_onnx(src, tmp_path / "x", opset=17)
    (tmp_path / "file").write_text("")
    with pytest.raises(EdgeMoEError, match="not a directory"):
        export_onnx(src, tmp_path / "file")
    with pytest.raises(EdgeMoEError, match="does not exist"):
        export_onnx(src, tmp_path / "missing" / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _non_default(f):
    """A value of arch field f (its schema entry) other than its default, within its range."""
    e = f.metadata["schema"]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kind = e["kind"]
    if kind == "enum":
        return next(n for n in reversed(e["names"]) if n != default)
    if kind in ("list", "map"):
        return [0] if kind == "list" else [[0, 0]]
    if kind == "id":
        return 7
    return not default if kind == "bool" else (default or 1) * 2 if kind == "float" else default + 1


def test_every_option_the_writer_does_not_build_is_refused_by_name():
    """The refusal comes from the arch schema: each non-required field the writer does not list (or a value it does
    not list), set away from its default, is named; a field added to the schema later is refused the same way."""
    import copy

    from edgemoe_export.onnx_export import SUPPORTED_OPTIONS, check_supported, unsupported_options

    base = edgemoe.ArchSpec(family="t", n_layers=2, hidden=64, vocab=100, n_heads=4, n_kv_heads=2, head_dim=16,
                            n_experts=4, top_k=2, expert_ffn=32)
    assert unsupported_options(base) == []
    supported = copy.copy(base)
    refused = []
    for f in dataclasses.fields(base):
        if f.metadata["schema"]["required"]:
            continue
        allowed = SUPPORTED_OPTIONS.get(f.name, ())
        if allowed is None:  # any value: setting it is fine
            setattr(supported, f.name, _non_default(f))
            continue
        others = [n for n in f.metadata["schema"].get("names", ()) if n not in allowed and n != f.default]
        for value in [_non_default(f), *others]:
            spec = copy.copy(base)  # no __post_init__: any single field, even one needing others
            setattr(spec, f.name, value)
            with pytest.raises(EdgeMoEError, match=rf"ONNX export: t sets {f.name}={re.escape(repr(value))}, "
                                                    r".*does not build.*Export to the edgemoe container or GGUF"):
                check_supported(spec)
            refused.append(f.name)
    assert unsupported_options(supported) == [] and {"attn_sinks", "v_norm", "kv_lora_rank"} <= set(refused)
    future = dataclasses.make_dataclass("FutureSpec", [("future_option", bool, dataclasses.field(
        default=False, metadata={"schema": {"required": False, "kind": "bool"}}))], bases=(type(base),))
    spec = future(**base.to_json(), future_option=True)
    with pytest.raises(EdgeMoEError, match="sets future_option=True, which this ONNX writer does not build"):
        check_supported(spec)


def test_sigmoid_routing_without_renormalization_needs_standard_ops(st_dir, tmp_path):
    from edgemoe_export import open_checkpoint

    ck = open_checkpoint(st_dir("sigmoid_tied"))
    ck.spec = dataclasses.replace(ck.spec, norm_topk=False)
    with pytest.raises(EdgeMoEError, match="moe_op='standard'"):
        export_onnx(ck, tmp_path / "x", moe_op="ort")
    path = export_onnx(ck, tmp_path / "auto", show_progress=False)  # auto falls back to standard ops
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MoE" not in ops
    from edgemoe.reference import reference_logits

    _, w = source_weights(ck)
    ids = PROMPT
    assert rel_err(ort_logits(path, ids), reference_logits(ck.spec, w.__getitem__, ids)) <= TOL


def test_failed_export_leaves_no_output(tiny_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(tiny_dir("qwen3moe"), tmp_path / "out", show_progress=False)
    assert not list(tmp_path.iterdir())
