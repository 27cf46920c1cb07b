"""No silent engine switch: engine="auto" is the C engine; a file it refuses, or a missing C core, is one clear
error (the NumPy engine runs only when asked for)."""

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

import edgemoe

PREAMBLE = struct.Struct("<4sIQQI")  # docs/FORMAT.md


def _with_arch(src, dst, **changes):
    """`src` with arch fields changed in its index, the index checksum repaired (the writer refuses such a spec)."""
    data = src.read_bytes()
    _, version, off, n, _ = PREAMBLE.unpack_from(data)
    index = json.loads(data[off:off + n])
    index["arch"].update(changes)
    text = json.dumps(index, sort_keys=True).encode()
    head = bytearray(data[:off])
    PREAMBLE.pack_into(head, 0, b"EMOE", version, off, len(text), zlib.crc32(text))
    dst.write_bytes(bytes(head) + text)
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


def test_a_checkout_without_its_core_says_so(tmp_path):
    """`python` started in a checkout after `pip install .` imports the checkout's edgemoe/, which has no C core:
    the error names that cause, not only the paths it tried."""
    import os
    import shutil
    import subprocess

    checkout = tmp_path / "checkout"
    shutil.copytree(Path(edgemoe.__file__).parent, checkout / "edgemoe",
                    ignore=shutil.ignore_patterns("*.so", "*.dylib", "*.dll", "__pycache__"))
    (checkout / "native").mkdir()
    (checkout / "native" / "CMakeLists.txt").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "EDGEMOE_NATIVE_LIB"}
    r = subprocess.run([sys.executable, "-c", "import edgemoe._native"], cwd=checkout, env=env, capture_output=True,
                       text=True, check=False, timeout=60)
    assert r.returncode != 0 and f"source tree in {checkout}" in r.stderr and "pip install -e ." in r.stderr, r.stderr
