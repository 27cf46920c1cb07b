"""One tensor table: the C core's (native/src/tensor_table.c), exported by emoe_tensor_table_json; edgemoe.arch's
TENSOR_TABLE and docs/FORMAT.md's tensor names are made from it. These tests keep the rest equal to it: Python's
evaluation of the rows (shape terms: arch._dim, layer kinds: arch._layer_has, options) yields the C enumeration
(emoe_model_tensor) for specs that use every row; every name the container writers produce is a table name with the
table's shape; the C loader (one table walk for every storage) names what a file lacks; FORMAT.md is the generated
table."""

import ctypes
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from tiny_models import FAMILIES

import edgemoe
import edgemoe.arch
from edgemoe import _native as N
from edgemoe import arch_doc
from edgemoe.arch import (
    EXPERT_MATRICES,
    GLOBAL_TENSORS,
    ArchSpec,
    _dim,
    _layer_has,
    model_tensors,
    schema,
    tensor_schema,
    tensor_table,
)
from edgemoe.container import ContainerWriter, open_container

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"  # this checkout's, installed or not
CALIB = "the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. " * 60
BASE = {"n_layers": 4, "hidden": 64, "vocab": 50, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "n_experts": 6,
        "top_k": 2, "expert_ffn": 32}
# Specs shaped like each family's (tests/tiny_*.py exports), small enough to build in microseconds; together they
# use every row of the table (test_the_specs_use_every_row).
SPECS = {
    "qwen2moe_merged": dict(BASE, family="qwen2moe", n_layers=3, qkv_bias=True, shared_ffn=48, shared_gate=True,
                            dense_layers=[1], dense_ffn=96, tie_embeddings=True,
                            expert_map=[[0, 0, 1, 2, -1, 1], [], [0, 1, 2, 2, 1, 0]]),
    "olmoe": dict(BASE, family="olmoe", qk_norm="full"),
    "gptoss": dict(BASE, family="gptoss", qkv_bias=True, activation="swiglu_clamp", sliding_window=5,
                   swa_layers=[0, 2], attn_sinks=True, o_bias=True, router_bias=True, expert_bias=True,
                   rope_scaling="yarn", rope_factor=8.0),
    "gemma4": dict(BASE, family="gemma4", n_layers=5, head_dim=24, qk_norm="head", router_input="residual_norm",
                   activation="geglu_tanh", dense_ffn=48, sliding_window=5, swa_layers=[0, 1, 3],
                   tie_embeddings=True, global_head_dim=32, global_kv_heads=1, global_rope_angles=4,
                   global_k_eq_v=True, v_norm=True, post_norms=True, dense_beside_moe=True, layer_scale=True,
                   logit_softcap=30.0),
    "lfm2": dict(BASE, family="lfm2moe", n_layers=6, qk_norm="head", router_fn="sigmoid", norm_topk=True,
                 dense_ffn=96, dense_layers=[0, 1], score_bias=True, conv_layers=[0, 2, 3, 5], conv_kernel=3),
    "qwen3next": dict(BASE, family="qwen3next", n_layers=5, head_dim=24, rope_dim=6, qk_norm="head", shared_ffn=36,
                      shared_gate=True, dense_ffn=48, dense_layers=[2], linear_attn_layers=[0, 2, 3],
                      linear_k_heads=2, linear_v_heads=4, linear_k_dim=16, linear_v_dim=12, linear_conv=4,
                      attn_gate=True),
    "deepseek_v3": dict(BASE, family="deepseek2", n_layers=3, n_kv_heads=4, head_dim=24, rope_dim=8,
                        router_fn="sigmoid", norm_topk=True, shared_ffn=32, dense_ffn=96, dense_layers=[0],
                        score_bias=True, kv_lora_rank=32, q_lora_rank=24, qk_nope_dim=16, v_head_dim=24),
    "deepseek_v2_lite": dict(BASE, family="deepseek2", n_layers=2, n_kv_heads=4, head_dim=24, rope_dim=8,
                             kv_lora_rank=32, qk_nope_dim=16, v_head_dim=24),
}


def c_tensors(spec: ArchSpec) -> list:
    h = N.ModelHandle(spec.dumps(), 8, False, 1)  # the core parses the same JSON a container stores
    try:
        return h.tensors()
    finally:
        h.close()


def role_of(name: str) -> str:
    """The table row a container name is an instance of (exactly one)."""
    hits = [role for role, pattern, *_ in tensor_table()
            if re.fullmatch(re.escape(pattern).replace(r"\{layer\}", "(0|[1-9][0-9]*)")
                            .replace(r"\{expert\}", "(0|[1-9][0-9]*)"), name)]
    assert len(hits) == 1, (name, hits)
    return hits[0]


def test_the_python_view_is_the_c_table():
    ts = tensor_schema()
    assert ts == N.tensor_table() and len(tensor_table()) == len(ts["tensors"])
    fields = {e["name"]: e for e in schema()}
    spec = ArchSpec(**SPECS["gemma4"])
    for row, t in zip(tensor_table(), ts["tensors"]):
        role, pattern, scope, rows, cols, condition, need = row
        assert (role, pattern, scope, rows, cols, need) == (t["role"], t["pattern"], t["scope"], t["rows"],
                                                            t["cols"], t["need"])
        assert condition.split(":")[0] == t["layers"] and (t["option"] is None) == (":" not in condition)
        assert pattern.count("{") == {"global": 0, "layer": 1, "expert": 2}[scope], role
        if t["option"]:  # C reads the option as an int32 that must be non-zero: an int, bool or enum field
            assert fields[t["option"]]["kind"] in ("int", "bool", "enum"), role
    assert len({row[0] for row in tensor_table()}) == len(tensor_table())  # roles are unique
    # the views made from it on first use behave as the dict and tuple they were
    assert isinstance(GLOBAL_TENSORS, Mapping) and isinstance(EXPERT_MATRICES, Sequence)
    assert dict(GLOBAL_TENSORS) == {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
                                    "lm_head": "output.weight"} and GLOBAL_TENSORS["embed"] == "token_embd.weight"
    assert tuple(EXPERT_MATRICES) == ("gate", "up", "down") == EXPERT_MATRICES and EXPERT_MATRICES.index("up") == 1
    assert edgemoe.arch.TENSOR_TABLE == tensor_table()
    # every shape term and layer kind the C table names has its Python evaluation (a new one fails here first)
    for d in ts["dims"]:
        assert isinstance(_dim(spec, d["name"], 0), int) and d["doc"], d
    for k in ts["layer_kinds"]:
        assert isinstance(_layer_has(spec, k["name"], 0), bool) and k["doc"], k
    assert {d["name"] for d in ts["dims"]} >= {x for row in tensor_table() for x in row[3:5] if x}
    assert {k["name"] for k in ts["layer_kinds"]} == {row[5].split(":")[0] for row in tensor_table()}
    assert {n["name"] for n in ts["needs"]} == {row[6] for row in tensor_table()}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_python_and_c_enumerate_the_same_tensors(name):
    spec = ArchSpec.from_json(SPECS[name])  # the C parser accepts it, so the spec is a real one
    py = model_tensors(spec)
    assert py == c_tensors(spec)
    h = N.ModelHandle(spec.dumps(), 8, False, 1)
    try:  # and C resolves each name back to its row's shape
        for tname, shape, _ in py:
            assert h.expected_shape(tname) == ((1, shape[0]) if len(shape) == 1 else shape), tname
    finally:
        h.close()


def test_the_specs_use_every_row():
    used = {role_of(n) for spec in SPECS.values() for n, _, _ in model_tensors(ArchSpec(**spec))}
    assert used == {row[0] for row in tensor_table()}


def test_merged_layers_list_their_stored_experts_and_which_are_routed():
    spec = ArchSpec(**SPECS["qwen2moe_merged"])  # layer 2 stores 3 groups
    req = {n: r for n, _, r in model_tensors(spec)}
    assert req["blk.2.expert.2.ffn_up.weight"] and "blk.2.expert.3.ffn_up.weight" not in req
    gap = dataclasses.replace(spec, expert_map=[[0, 0, 1, 2, -1, 1], [], [0, 1, 3, 3, 1, 0]])  # group 2 unused
    with pytest.raises(N.NativeError, match="no gaps"):
        c_tensors(gap)
    assert not req["output.weight"] and not req["blk.0.ffn_gate_inp_pre.weight"]
    assert "blk.0.expert.3.ffn_gate.weight" not in req and "blk.1.ffn_down.weight" in req


def assert_names_are_the_tables(path):
    """Every tensor a writer put in the file is a table name with the table's shape, and the file holds every
    required tensor of its arch (only optional ones may be absent)."""
    c = open_container(path, verify=False)
    spec = c.spec
    want = {n: (shape, req) for n, shape, req in model_tensors(spec)}
    names = [n for n, t in c.tensors.items() if t.kind != "blob"]
    for n in names:
        role_of(n)
        assert n in want, f"{path.name}: {n} is a table name but not one this arch reads"
        assert tuple(c.tensors[n].shape) == want[n][0], n
    assert {n for n, (_, req) in want.items() if req} <= set(names)
    c.close()
    h = N.open_resident(path, 8, False, 1)  # the C loader reads the same names: the file's model is ready
    try:
        assert h.tensors() == model_tensors(spec)
    finally:
        h.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exporter_writes_table_names(family, tiny_emoe):
    assert_names_are_the_tables(tiny_emoe(family, 16))


def test_smallthinker_and_gguf_sourced_exports_write_table_names(tiny_dir, tmp_path):
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf
    from tiny_smallthinker import build_tiny_smallthinker

    st = export(build_tiny_smallthinker(tmp_path / "st"), tmp_path / "st.emoe", show_progress=False)
    spec = open_container(st, verify=False).spec
    assert spec.nope_layers or spec.dense_layers or spec.router_input == "layer_input"  # the family's own options
    assert_names_are_the_tables(st)
    gguf = export_gguf(tiny_dir("qwen3moe"), tmp_path / "q3.gguf", show_progress=False)
    assert_names_are_the_tables(export(gguf, tmp_path / "from_gguf.emoe", show_progress=False))


def test_mwq_container_loads_through_the_c_loader(tiny_dir, tmp_path):
    from edgemoe_export import export

    (tmp_path / "calib.txt").write_text(CALIB)
    path = export(tiny_dir("olmoe"), tmp_path / "mwq.emoe", bits=4, calib=tmp_path / "calib.txt", calib_tokens=512,
                  show_progress=False)
    assert_names_are_the_tables(path)
    with edgemoe.load(path) as m, edgemoe.load(path, engine="numpy") as ref:  # planes registered from the file
        assert m.engine_name == "c"
        ids = [1, 5, 9, 2]
        a, b = m.logits(ids), ref.logits(ids)
        assert np.abs(a - b).max() / np.abs(b).max() < 0.05  # int8 activations against the f32 reference


def _rewrite(src, dst, drop=(), reshape=None):
    """Copy a container without the tensors in drop, or with one tensor given another shape (same bytes)."""
    c = open_container(src, verify=False)
    w = ContainerWriter(dst, c.spec, c.metadata)
    for name, t in c.tensors.items():
        if name in drop:
            continue
        shape = reshape[1] if reshape and name == reshape[0] else t.shape
        w.add_tensor(name, c.raw(name), t.dtype, shape=shape, kind=t.kind)
    w.close()
    c.close()
    return dst


def test_the_loader_names_a_missing_tensor_and_a_wrong_shape(tiny_emoe, tmp_path):
    src = tiny_emoe("qwen2moe", 16)
    bad = _rewrite(src, tmp_path / "missing.emoe", drop={"blk.1.attn_k.bias"})
    for kw in ({}, {"memory_budget": "1GB"}):  # one table walk for both storage policies
        with pytest.raises(edgemoe.EdgeMoEError, match=r"missing tensor 'blk\.1\.attn_k\.bias'"):
            edgemoe.load(bad, **kw)
    spec = open_container(src, verify=False).spec
    name = "blk.0.ffn_gate_inp.weight"
    bad = _rewrite(src, tmp_path / "shape.emoe", reshape=(name, (spec.hidden, spec.n_experts)))
    for kw in ({}, {"memory_budget": "1GB"}):
        with pytest.raises(edgemoe.EdgeMoEError, match=rf"'{name}' has shape \[{spec.hidden}, {spec.n_experts}\], "
                                                       rf"expected \[{spec.n_experts}, {spec.hidden}\]"):
            edgemoe.load(bad, **kw)


def test_a_name_the_config_does_not_use_is_refused_with_its_condition():
    h = N.ModelHandle(ArchSpec(**SPECS["olmoe"]).dumps(), 8, False, 1)
    try:
        with pytest.raises(N.NativeError, match=r"'blk\.0\.attn_sinks\.weight' is not used by this config "
                                                r"\(needs attn_sinks\)"):
            h.expected_shape("blk.0.attn_sinks.weight")
        with pytest.raises(N.NativeError, match=r"unknown tensor name 'blk\.0\.attn_q\.weights'"):
            h.expected_shape("blk.0.attn_q.weights")
    finally:
        h.close()
    h = N.ModelHandle(ArchSpec(**SPECS["deepseek_v3"]).dumps(), 8, False, 1)
    try:
        with pytest.raises(N.NativeError, match=r"needs q_lora_rank = 0"):
            h.expected_shape("blk.1.attn_q.weight")
    finally:
        h.close()


def test_the_table_text_follows_snprintf_contract():
    fn = N._sig("emoe_tensor_table_json", N._sz, N._cp, N._sz)
    n = fn(None, 0)
    full = ctypes.create_string_buffer(n + 1)
    assert fn(full, n + 1) == n and len(full.value) == n
    assert json.loads(full.value) == tensor_schema()
    short = ctypes.create_string_buffer(b"\xff" * 20)
    assert fn(short, 10) == n and short.value == full.value[:9] and short.raw[10:20] == b"\xff" * 10


def test_an_old_core_without_the_table_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(N, "_lib", object())  # a library without emoe_tensor_table_json
    with pytest.raises(N.NativeLibraryNotFound, match="has no emoe_tensor_table_json.*Rebuild it"):
        N.tensor_table()


def test_format_md_tensor_names_are_the_generated_ones(tmp_path):
    text = FORMAT_MD.read_text()
    assert arch_doc.updated(text) == text, "docs/FORMAT.md's tensor names are out of date: run python -m " \
                                           "edgemoe.arch_doc"
    table = arch_doc.render_tensor_table()
    for role, pattern, *_ in tensor_table():
        assert f"| `{pattern.replace('{layer}', '{L}').replace('{expert}', '{E}')}` |" in table, role
    with pytest.raises(ValueError, match="tensor table's markers are missing"):
        arch_doc.updated(text.replace(arch_doc.TENSORS_END, ""))
    stale = tmp_path / "FORMAT.md"
    stale.write_text(text.replace("| `blk.{L}.attn_sinks.weight` |", "| `blk.{L}.attn_sink.weight` |"))
    assert arch_doc.main([str(stale), "--check"]) == 1
    assert arch_doc.main([str(stale)]) == 0 and stale.read_text() == text
