"""One tensor table on both sides: the names and shapes Python's table (edgemoe.arch.TENSOR_TABLE) yields for a model
equal the C table's (native/src/tensor_table.c, enumerated by emoe_model_tensor), for every tiny family, a merged
layer and an MWQ container; and the C loader (one table walk for every storage) names what a file lacks."""

import dataclasses

import numpy as np
import pytest
from tiny_models import FAMILIES

import edgemoe
from edgemoe import _native as N
from edgemoe.arch import ArchSpec, model_tensors
from edgemoe.container import ContainerWriter, open_container

CALIB = "the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. " * 60


def c_tensors(spec: ArchSpec) -> list:
    h = N.ModelHandle(spec.dumps(), 8, False, 1)  # the core parses the same JSON a container stores
    try:
        return h.tensors()
    finally:
        h.close()


@pytest.fixture(scope="module")
def smallthinker_emoe(tmp_path_factory):
    from edgemoe_export import export
    from tiny_smallthinker import build_tiny_smallthinker

    d = tmp_path_factory.mktemp("tt_st")
    return export(build_tiny_smallthinker(d / "ckpt"), d / "st.emoe", show_progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_python_and_c_tables_agree_and_the_c_loader_reads_every_family(family, tiny_emoe):
    path = tiny_emoe(family, 16)
    spec = open_container(path, verify=False).spec
    py = model_tensors(spec)
    assert py == c_tensors(spec)
    h = N.open_resident(path, 8, False, 1)  # the file's model: the same table, every tensor registered
    try:
        assert h.tensors() == py
    finally:
        h.close()


def test_smallthinker_tables_agree(smallthinker_emoe):
    spec = open_container(smallthinker_emoe, verify=False).spec
    assert spec.nope_layers or spec.dense_layers or spec.router_input == "layer_input"  # the family's own options
    assert model_tensors(spec) == c_tensors(spec)


def test_merged_layers_list_their_stored_experts_and_which_are_routed():
    spec = ArchSpec("qwen2moe", n_layers=3, hidden=64, vocab=50, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=6,
                    top_k=2, expert_ffn=32, qkv_bias=True, shared_ffn=48, shared_gate=True, dense_layers=[1],
                    dense_ffn=96, tie_embeddings=True,
                    expert_map=[[0, 0, 1, 2, -1, 1], [], [0, 1, 2, 2, 1, 0]])  # layer 2 stores 3 groups
    py = model_tensors(spec)
    assert py == c_tensors(spec)
    req = {n: r for n, _, r in py}
    assert req["blk.2.expert.2.ffn_up.weight"] and "blk.2.expert.3.ffn_up.weight" not in req
    gap = dataclasses.replace(spec, expert_map=[[0, 0, 1, 2, -1, 1], [], [0, 1, 3, 3, 1, 0]])  # group 2 unused
    with pytest.raises(N.NativeError, match="no gaps"):
        c_tensors(gap)
    assert not req["output.weight"] and not req["blk.0.ffn_gate_inp_pre.weight"]
    assert "blk.0.expert.3.ffn_gate.weight" not in req and "blk.1.ffn_down.weight" in req


def test_mwq_container_loads_through_the_c_loader(tiny_dir, tmp_path):
    from edgemoe_export import export

    (tmp_path / "calib.txt").write_text(CALIB)
    path = export(tiny_dir("olmoe"), tmp_path / "mwq.emoe", bits=4, calib=tmp_path / "calib.txt", calib_tokens=512,
                  show_progress=False)
    spec = open_container(path, verify=False).spec
    h = N.open_resident(path, 8, False, 1)
    try:
        assert h.tensors() == model_tensors(spec) == c_tensors(spec)
    finally:
        h.close()
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
