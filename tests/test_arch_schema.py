"""One list of arch keys: ArchSpec, the C parser and docs/FORMAT.md all come from native/src/arch_fields.h.

ArchSpec is built from the table the core exports (emoe_arch_schema_json); these tests keep the three from drifting:
the fields and defaults are the table's, the ranges the table states are exactly where the C parser switches from
accepting to refusing (so Python's view and the docs say what the parser does), and FORMAT.md's table is the
generated one."""

import ctypes
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe import _native as N
from edgemoe import arch_doc

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"  # this checkout's, installed or not
from edgemoe.arch import ArchSpec, schema
from edgemoe.errors import InvalidFileError

INT32_MAX = 2**31 - 1
BASE = {"family": "t", "n_layers": 4, "hidden": 64, "vocab": 100, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
        "n_experts": 8, "top_k": 2, "expert_ffn": 32}
ENTRY = {e["name"]: e for e in schema()}


def c_accepts(arch: dict) -> bool:
    try:
        N.arch_check(json.dumps(arch))
    except N.NativeError:
        return False
    return True


def table_accepts(e: dict, v) -> bool:
    """What the schema entry alone says about value v (the Python side's view of the C table's range)."""
    kind = e["kind"]
    if kind in ("int", "id"):
        if v is None:
            return "None" in e["type"]
        return type(v) is int and e["lo"] <= v <= e["hi"]
    if kind == "float":
        import numpy as np

        ok = type(v) in (int, float) and (v == 0 and e["zero_ok"] or 0 < v <= e["hi"] and np.float32(v) > 0)
        return bool(ok)
    if kind == "bool":
        return type(v) is bool
    if kind == "enum":
        return v in e["names"]
    if kind == "string":
        return isinstance(v, str) and len(v.encode()) <= e["max_bytes"]
    if kind == "list":
        return isinstance(v, list) and all(type(x) is int and 0 <= x < BASE["n_layers"] for x in v) \
            and len(set(v)) == len(v)
    raise AssertionError(kind)


def test_archspec_fields_and_defaults_are_the_c_table():
    fields = dataclasses.fields(ArchSpec)
    assert [f.name for f in fields] == [e["name"] for e in schema()]
    assert schema()[0]["name"] == "family" and len(ENTRY) == len(schema())  # required keys first, names unique
    for f in fields:
        e = ENTRY[f.name]
        assert f.metadata["schema"] == e and f.type == e["type"] and e["doc"], f.name
        if e["required"]:
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        want = {"float": float, "bool": bool, "enum": str, "list": list, "map": list, "int": int}.get(e["kind"])
        if e["kind"] == "id":
            want = type(None) if e["default"] is None else int
        assert type(default) is want and default == e["default"], (f.name, default, e["default"])
        if e["kind"] == "enum":
            assert default == e["names"][0]  # the C reader's absent value is index 0
    # every default, written out, is inside the C reader's ranges and reads back the same
    spec = ArchSpec(**BASE)
    full = spec.to_json()
    assert set(full) == set(ENTRY) and c_accepts(full)
    assert ArchSpec.from_json(full) == spec == ArchSpec.from_json(BASE)


EDGES = {  # a few fields of each kind: the values at and just past each end of the table's range
    "n_layers": [1, 4, 4096, 0, 4097, -1, 4.0, "4", True, None],
    "vocab": [1, 1 << 24, 0, (1 << 24) + 1],
    "sliding_window": [0, INT32_MAX, -1, INT32_MAX + 1],
    "conv_kernel": [0, 64, -1, 65],
    "shared_ffn": [0, 1 << 20, -1, (1 << 20) + 1],
    "yarn_orig_ctx": [1, INT32_MAX, 0, INT32_MAX + 1],
    "max_position": [1, INT32_MAX, 0, None, INT32_MAX + 1],
    "bos_token_id": [None, -1, 0, INT32_MAX, -2, INT32_MAX + 1, 1.5],
    "norm_eps": [1e-6, 1e-45, 3e38, 0, 0.0, 1e-46, -1e-6, 3.0000001e38, True, "1e-6"],
    "rope_theta": [1, 3e38, 0, -1.0],
    "attn_scale": [0, 0.0, 1e-45, 3e38, -1e-30, 1e-46, 3.1e38],
    "logit_softcap": [0.0, 30.0, -30.0],
    "mla_norm_eps": [1e-6, 0.0, -1e-6],
    "qkv_bias": [True, False, 0, 1, "true", None],
    "v_norm": [True, False, 0],
    "attn_sinks": [True, False, 1],
    "rope_kind": ["neox", "norm", "NEOX", "", 0, None],
    "activation": ["swiglu", "reglu", "swiglu_clamp", "geglu_tanh", "gelu", 1],
    "group_score": ["top2_sum", "max", "min"],
    "nope_layers": [[], [0], [3], [0, 1, 2, 3], [-1], [4], [0, 0], [1.0], ["1"], 0],
    "swa_layers": [[], [2], [4]],  # with a sliding window below
    "family": ["", "x" * 256, "x" * 257, 1, None],
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_the_c_parser_and_archspec_accept_exactly_the_tables_range(name):
    e = ENTRY[name]
    base = {**BASE, "sliding_window": 8} if name == "swa_layers" else BASE
    seen = set()
    for v in EDGES[name]:
        arch = {**base, name: v}
        want = table_accepts(e, v)
        seen.add(want)
        assert c_accepts(arch) == want, (name, v, want)
        if want:
            spec = ArchSpec.from_json(arch)
            assert getattr(spec, name) == v and ArchSpec.from_json(spec.to_json()) == spec
        else:
            with pytest.raises(InvalidFileError, match=name):
                ArchSpec.from_json(arch)
    assert seen == {True, False}, name  # both sides of each edge were tried


def test_an_unknown_or_missing_key_is_refused_like_the_table_says():
    for e in schema():
        if e["required"]:
            arch = {k: v for k, v in BASE.items() if k != e["name"]}
            with pytest.raises(InvalidFileError, match=f"required field '{e['name']}' is missing"):
                ArchSpec.from_json(arch)
    with pytest.raises(InvalidFileError, match="unknown field 'v_norms'"):
        ArchSpec.from_json({**BASE, "v_norms": True})
    with pytest.raises(TypeError, match="v_norms"):
        ArchSpec(**BASE, v_norms=True)


def test_enum_values_outside_the_table_are_refused_by_the_constructor_too():
    for e in schema():
        if e["kind"] == "enum":
            ArchSpec(**BASE, **{e["name"]: e["names"][-1]})
            with pytest.raises(ValueError, match=e["name"]):
                ArchSpec(**BASE, **{e["name"]: "no such value"})


def test_layer_kind_names_each_layers_mixer():
    spec = ArchSpec(**{**BASE, "n_layers": 5}, linear_attn_layers=[0, 3], conv_layers=[2], linear_k_heads=1,
                    linear_v_heads=2, linear_k_dim=8, linear_v_dim=8, linear_conv=4, conv_kernel=3)
    assert [spec.layer_kind(layer) for layer in range(5)] == ["linear", "attention", "conv", "linear", "attention"]
    assert [spec.is_attention_layer(layer) for layer in range(5)] == [False, True, False, False, True]
    assert spec.has_layer_state and not ArchSpec(**BASE).has_layer_state
    assert c_accepts(spec.to_json())


def test_the_schema_text_follows_snprintf_contract():
    fn = N._sig("emoe_arch_schema_json", N._sz, N._cp, N._sz)
    n = fn(None, 0)
    full = ctypes.create_string_buffer(n + 1)
    assert fn(full, n + 1) == n and len(full.value) == n
    assert json.loads(full.value) == list(schema())
    short = ctypes.create_string_buffer(b"\xff" * 20)
    assert fn(short, 10) == n and short.value == full.value[:9] and short.raw[10:20] == b"\xff" * 10


def test_format_md_table_is_the_generated_one():
    text = FORMAT_MD.read_text()
    assert arch_doc.updated(text) == text, "docs/FORMAT.md's arch table is out of date: run python -m edgemoe.arch_doc"
    table = arch_doc.render_table()
    for e in schema():
        assert f"| `{e['name']}` |" in table
    with pytest.raises(ValueError, match="markers are missing"):
        arch_doc.updated(text.replace(arch_doc.END, ""))


def test_arch_doc_check_mode(tmp_path):
    stale = tmp_path / "FORMAT.md"
    stale.write_text(FORMAT_MD.read_text().replace("| `v_norm` |", "| `v_norm_old` |"))
    assert arch_doc.main([str(stale), "--check"]) == 1
    assert arch_doc.main([str(stale)]) == 0 and stale.read_text() == FORMAT_MD.read_text()
    assert arch_doc.main([str(stale), "--check"]) == 0


def test_an_old_core_without_the_schema_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(N, "_lib", object())  # a library without emoe_arch_schema_json
    with pytest.raises(N.NativeLibraryNotFound, match="has no emoe_arch_schema_json.*Rebuild it"):
        N.arch_schema()


def test_edgemoe_imports_without_the_core_and_archspec_says_what_is_missing(tmp_path):
    """ArchSpec is made from the core's table on first use: `edgemoe --help` needs no core; ArchSpec without one is
    the core's one clear error. (A copy of the package without its core, as test_engine_choice does.)"""
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(N.__file__).parent, checkout / "edgemoe",
                    ignore=shutil.ignore_patterns("*.so", "*.dylib", "*.dll", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "EDGEMOE_NATIVE_LIB"}

    def run(code):
        return subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True,
                              check=False, timeout=120)

    r = run("import sys, edgemoe.cli; sys.exit(edgemoe.cli.main(['--help']))")
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr
    r = run("import edgemoe; edgemoe.ArchSpec")
    assert r.returncode != 0 and "NativeLibraryNotFound" in r.stderr and "C core" in r.stderr, r.stderr
