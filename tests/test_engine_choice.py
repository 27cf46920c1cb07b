"""No silent engine switch: engine="auto" is the C engine; a file it refuses, or a missing C core, is one clear
error (the NumPy engine runs only when asked for)."""

import dataclasses
import sys

import pytest

import edgemoe
from edgemoe.container import ContainerWriter, open_container


def _with_arch(src, dst, **changes):
    c = open_container(src, verify=False)
    w = ContainerWriter(dst, dataclasses.replace(c.spec, **changes), c.metadata)
    for name, t in c.tensors.items():
        w.add_tensor(name, c.raw(name), t.dtype, shape=t.shape, kind=t.kind)
    w.close()
    c.close()
    return dst


def test_a_file_the_c_core_refuses_is_an_error_not_the_numpy_engine(tiny_emoe, tmp_path):
    bad = _with_arch(tiny_emoe("olmoe", 16), tmp_path / "neg_theta.emoe", rope_theta=-1.0)
    for engine in ("auto", "c"):
        with pytest.raises(edgemoe.EdgeMoEError, match="rope_theta"):
            edgemoe.load(bad, engine=engine)


def test_a_missing_c_core_is_one_clear_error(tiny_emoe, monkeypatch):
    monkeypatch.setitem(sys.modules, "edgemoe.engine_c", None)  # import edgemoe.engine_c now fails
    for kw in ({}, {"engine": "c"}, {"memory_budget": "1GB"}):
        with pytest.raises(edgemoe.EdgeMoEError, match="C core is not available.*engine='numpy'"):
            edgemoe.load(tiny_emoe("olmoe", 16), **kw)
    with edgemoe.load(tiny_emoe("olmoe", 16), engine="numpy") as m:  # the reference, when asked for
        assert m.engine_name == "numpy" and m.logits([1, 2, 3]).shape == (3, m.spec.vocab)
