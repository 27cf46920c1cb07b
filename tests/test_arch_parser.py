"""One parser for the container: hostile indexes (checksum repaired) are refused with one clear edgemoe error by every
path (resident and under a memory budget), and Python and C read an accepted file the same way.

The hostile files are real exports of a tiny model with one change in the index each; docs/FORMAT.md: the preamble
is struct "<4sIQQI" (magic, version, index_offset, index_nbytes, index_crc32), the JSON index sits at the end.
"""

import json
import os
import signal
import struct
import subprocess
import zlib

import numpy as np
import pytest
from subprocess_python import PYTHON

import edgemoe
from edgemoe import _native as N
from edgemoe.arch import ArchSpec
from edgemoe.container import open_container
from edgemoe.errors import CorruptFileError, EdgeMoEError, FileReadError, InvalidFileError, NotAContainerError

PREAMBLE = struct.Struct("<4sIQQI")
BUDGET = "256MB"


def split(path):
    data = path.read_bytes()
    _, version, off, n, _ = PREAMBLE.unpack_from(data)
    return data, version, off, data[off:off + n]


def with_index(path, out, text: bytes):
    """`path` with its index replaced by `text`, the preamble's length and checksum repaired."""
    data, version, off, _ = split(path)
    head = bytearray(data[:off])
    PREAMBLE.pack_into(head, 0, b"EMOE", version, off, len(text), zlib.crc32(text))
    out.write_bytes(bytes(head) + text)
    return out


def dumps(index) -> bytes:
    return json.dumps(index, sort_keys=True).encode()  # the writer's own serialization


def arch_change(**changes):
    def f(index):
        index["arch"].update(changes)
        return dumps(index)
    return f


def arch_drop(key):
    def f(index):
        del index["arch"][key]
        return dumps(index)
    return f


def text_change(old: str, new: str):
    def f(index):
        text = dumps(index).decode()
        assert old in text, old
        return text.replace(old, new, 1).encode()
    return f


def first_tensor(**changes):
    def f(index):
        index["tensors"][0].update(changes)
        return dumps(index)
    return f


def tensor_drop(key):
    def f(index):
        del index["tensors"][0][key]
        return dumps(index)
    return f


def duplicate_tensor(index):
    index["tensors"].append(dict(index["tensors"][0]))
    return dumps(index)


def nan_eps(index):
    index["arch"]["norm_eps"] = float("nan")
    return json.dumps(index, sort_keys=True).encode()  # writes NaN, which JSON does not have


# name -> (index mutation, what the one-line message must say)
HOSTILE = {
    "duplicate key vocab": (lambda ix: text_change('"vocab": ', '"vocab": 320, "vocab": ')(ix), 'duplicate key "vocab"'),
    "NUL key vocab\\u0000 (issue 13)": (lambda ix: arch_change(**{"vocab\0": 320})(ix), "NUL"),
    "n_layers 0": (arch_change(n_layers=0), "'n_layers' must be an integer in 1..4096, got 0"),
    "n_layers 2^31-1": (arch_change(n_layers=2**31 - 1), "'n_layers' must be an integer in 1..4096"),
    "NaN norm_eps": (nan_eps, "not valid JSON"),
    "negative norm_eps": (arch_change(norm_eps=-1e-5), "'norm_eps' = -1e-05 must be a positive number"),
    "negative rope_theta": (arch_change(rope_theta=-10000.0), "'rope_theta' = -10000 must be a positive number"),
    "n_kv_heads 0": (arch_change(n_kv_heads=0), "'n_kv_heads' must be an integer in 1..1024, got 0"),
    "n_kv_heads 3": (arch_change(n_kv_heads=3), "is not a multiple of n_kv_heads = 3"),
    "top_k > n_experts": (arch_change(top_k=99), "top_k = 99 must be in 1..n_experts"),
    "hidden as a string": (arch_change(hidden="64"), "'hidden' must be an integer in 1..262144, got a string"),
    "hidden as a float": (arch_change(hidden=64.0), "got 64 (not an integer)"),
    "qkv_bias as 1": (arch_change(qkv_bias=1), "'qkv_bias' must be true or false, got a number"),
    "unknown rope_kind": (arch_change(rope_kind="yarn"), "'rope_kind' = 'yarn' is not one of 'neox', 'norm'"),
    "layer list out of range": (arch_change(nope_layers=[0, 7]), "'nope_layers' must hold layer numbers in 0..1"),
    "layer named twice": (arch_change(nope_layers=[1, 1]), "'nope_layers' names layer 1 twice"),
    "missing vocab": (arch_drop("vocab"), "required field 'vocab' is missing"),
    "topk_group > n_group": (arch_change(n_group=2, topk_group=3), "topk_group = 3 must be in 1..n_group = 2"),
    "n_group not dividing": (arch_change(n_group=3), "n_group = 3 must divide n_experts = 8"),
    "groups of one expert": (arch_change(n_group=8), "into groups of at least 2 experts"),
    "unknown group_score": (arch_change(group_score="sum"), "'group_score' = 'sum' is not one of 'top2_sum', 'max'"),
    "routed_scaling 0": (arch_change(routed_scaling=0.0), "'routed_scaling' = 0 must be a positive number"),
    "conv layers without taps": (arch_change(conv_layers=[0]), "conv_layers given but conv_kernel = 0"),
    "conv_kernel 65": (arch_change(conv_layers=[0], conv_kernel=65), "'conv_kernel' must be an integer in 0..64"),
    "negative norm_topk_eps": (arch_change(norm_topk_eps=-1e-6), "'norm_topk_eps' = -1e-06 must be a positive number"),
    "unknown arch key": (arch_change(mla_rank=64), "unknown field 'mla_rank' (written by a newer edgemoe?"),
    "deep nesting": (text_change('"metadata": {', '"metadata": {"deep": ' + "[" * 100000 + "]" * 100000 + ", "),
                     "nesting deeper than 64 levels"),
    "integer beyond int64": (text_change('"tensors": [{', '"tensors": [{"crc32": 18446744073709551616, '),
                             "does not fit in 64 bits"),
    "unknown dtype": (first_tensor(dtype="q4_k"), "unknown dtype 'q4_k'"),
    "missing nbytes": (tensor_drop("nbytes"), "'offset', 'nbytes' must be non-negative integers"),
    "unknown tensor key": (first_tensor(role="embed"), "unknown field 'role'"),
    "duplicate tensor": (duplicate_tensor, "appears twice"),
    "trailing garbage": (lambda ix: dumps(ix) + b" x", "unexpected data after the JSON value"),
}


@pytest.fixture(scope="module")
def tiny(tiny_emoe):
    return tiny_emoe("qwen3moe", 32)


@pytest.fixture(scope="module")
def hostile(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    files = {}
    for i, (name, (mutate, want)) in enumerate(HOSTILE.items()):
        index = json.loads(split(tiny)[3])
        files[name] = (with_index(tiny, root / f"h{i}.emoe", mutate(index)), want)
    return files


# One subprocess loads every hostile file both ways: a crash or a hang (timeout) is a failure naming the last file
# started, not a dead test run. Each result line: name, path kind, exception class, message.
RUNNER = r"""
import json, sys, traceback
import edgemoe
from edgemoe.errors import EdgeMoEError
for name, path, budget in json.loads(sys.argv[1]):
    print(json.dumps(["start", name, budget]), flush=True)
    try:
        m = edgemoe.load(path, memory_budget=budget, max_ctx=16)
        out = m.generate([1, 2, 3], max_new_tokens=2)
        print(json.dumps(["ran", name, budget, "", repr(out)]), flush=True)
    except EdgeMoEError as e:
        print(json.dumps(["refused", name, budget, type(e).__name__, str(e)]), flush=True)
    except BaseException as e:
        print(json.dumps(["bug", name, budget, type(e).__name__, traceback.format_exc()]), flush=True)
"""


def test_hostile_indexes_are_refused_by_every_path(hostile):
    jobs = [(name, str(p), budget) for name, (p, _) in hostile.items() for budget in (None, BUDGET)]
    try:
        run = subprocess.run([*PYTHON, "-c", RUNNER, json.dumps(jobs)], check=False,
                             capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        last = (e.stdout or b"").decode(errors="replace").strip().splitlines()[-1:]
        pytest.fail(f"hang: {last}")
    lines = [json.loads(x) for x in run.stdout.splitlines()]
    assert run.returncode == 0, f"crash (status {run.returncode}) after {lines[-1:]}: {run.stderr[-2000:]}"
    results = {(x[1], x[2]): x for x in lines if x[0] != "start"}
    assert len(results) == len(jobs)
    for name, (path, want) in hostile.items():
        for budget in (None, BUDGET):
            kind, _, _, cls, msg = results[(name, budget)]
            assert kind == "refused", f"{name} (budget {budget}): {kind} {cls} {msg}"
            assert cls == "InvalidFileError", f"{name} (budget {budget}): {cls}: {msg}"
            assert want in msg and path.name in msg and "\n" not in msg and "internal error" not in msg, \
                f"{name} (budget {budget}): {msg!r} lacks {want!r}"


def test_the_python_view_and_the_c_reader_agree(hostile):
    """ArchSpec.from_json asks the C reader: every hostile arch object C refuses in a file is refused in Python with the
    same message (NaN is not JSON: refused before it reaches C)."""
    n = 0
    for name, (path, want) in hostile.items():
        if name in ("duplicate key vocab", "deep nesting", "integer beyond int64", "trailing garbage") or \
                name.endswith(("dtype", "nbytes", "tensor key", "tensor")):
            continue  # not about the arch object, or not representable as a Python dict
        arch = json.loads(split(path)[3])["arch"]  # Python's json reads NaN and NUL keys
        with pytest.raises(InvalidFileError) as e:
            ArchSpec.from_json(arch)
        assert str(e.value).startswith("arch: ") and (want in str(e.value) or name == "NaN norm_eps"), (name, e.value)
        n += 1
    assert n >= 15


def test_issue_13_attack_means_one_thing(tiny, tmp_path):
    """"vocab": 16 with "vocab\\u0000": 320 was 16 to Python and 320 to C (an out-of-bounds write). Now neither the
    container reader, nor ArchSpec.from_json, nor the C model constructor accepts it."""
    index = json.loads(split(tiny)[3])
    index["arch"]["vocab\0"] = 320
    p = with_index(tiny, tmp_path / "attack.emoe", dumps(index))
    with pytest.raises(InvalidFileError, match="NUL"):
        open_container(p)
    with pytest.raises(InvalidFileError, match="NUL"):
        ArchSpec.from_json(index["arch"])
    with pytest.raises(N.NativeError, match="NUL") as e:
        N.ModelHandle(json.dumps(index["arch"]), 8, False, 1)
    assert e.value.status == N.ERR_INVALID
    with pytest.raises(N.NativeError, match="NUL"):
        N.arch_check(json.dumps(index["arch"]))


def test_error_kinds_cross_as_values(tiny, tmp_path):
    """emoe_container_open_status's kinds map to errors.py classes without reading the message."""
    with pytest.raises(FileReadError, match="no such file"):
        open_container(tmp_path / "absent.emoe")
    with pytest.raises(FileReadError, match="is a directory"):
        open_container(tmp_path)
    fifo = tmp_path / "fifo.emoe"
    os.mkfifo(fifo)  # no writer: opening it must not wait forever
    signal.alarm(20)
    try:
        with pytest.raises(FileReadError, match="not a regular file"):
            open_container(fifo)
    finally:
        signal.alarm(0)
    fifo.unlink()
    (tmp_path / "g.emoe").write_bytes(b"GGUF" + bytes(5000))
    with pytest.raises(NotAContainerError, match="not an edgemoe container"):
        open_container(tmp_path / "g.emoe")
    data, _, off, _ = split(tiny)
    bad = bytearray(data)
    bad[off + 10] ^= 1
    (tmp_path / "c.emoe").write_bytes(bytes(bad))
    with pytest.raises(CorruptFileError, match="checksum mismatch in the tensor index"):
        open_container(tmp_path / "c.emoe")
    (tmp_path / "t.emoe").write_bytes(data[:-5])
    with pytest.raises(CorruptFileError, match="truncated"):
        open_container(tmp_path / "t.emoe")
    bad = bytearray(data)
    bad[5000] ^= 0xFF  # inside the first tensor's data: its CRC-32 (verify=True) names it
    (tmp_path / "d.emoe").write_bytes(bytes(bad))
    with pytest.raises(CorruptFileError, match="checksum mismatch in tensor"):
        open_container(tmp_path / "d.emoe")
    open_container(tmp_path / "d.emoe", verify=False).close()  # structure only: opens
    for cls in (FileReadError, NotAContainerError, CorruptFileError, InvalidFileError):
        assert issubclass(cls, EdgeMoEError)


def test_valid_container_rewritten_still_loads_with_the_same_logits(tiny, tmp_path):
    """The repair path itself changes nothing: the index re-serialized (checksum recomputed) loads on both paths and
    gives bit-identical logits to the original file."""
    index = json.loads(split(tiny)[3])
    p = with_index(tiny, tmp_path / "same.emoe", dumps(index))
    ids = [1, 5, 9, 2, 7]
    with edgemoe.load(tiny, max_ctx=16) as m:
        ref = m.logits(ids)
        spec = m.spec
    with edgemoe.load(p, max_ctx=16) as m:
        assert m.spec == spec
        np.testing.assert_array_equal(m.logits(ids), ref)
    with edgemoe.load(p, max_ctx=16, memory_budget=BUDGET) as m:
        np.testing.assert_array_equal(m.logits(ids), ref)
    c = open_container(p)
    assert c.spec == spec and set(c.tensors) == {t["name"] for t in index["tensors"]}
    c.close()


def test_the_writer_refuses_what_the_reader_would(tiny, tmp_path):
    """ContainerWriter checks the spec with the same reader: an exporter never writes a file edgemoe refuses."""
    import dataclasses

    from edgemoe.container import ContainerWriter

    spec = open_container(tiny, verify=False).spec
    for bad, want in ((dataclasses.replace(spec, qkv_bias=1), "'qkv_bias' must be true or false"),
                      (dataclasses.replace(spec, swa_layers=[0]), "swa_layers given but sliding_window = 0"),
                      (dataclasses.replace(spec, norm_eps=float("inf")), "not a JSON object")):
        with pytest.raises(InvalidFileError, match=want):
            ContainerWriter(tmp_path / "out.emoe", bad)
        assert list(tmp_path.iterdir()) == []
