"""edgemoe.load's options: each bad value is one EdgeMoEError naming the option, at load (not at generate, not a
bare ValueError, not a silent fallback); good values still load and run."""

from __future__ import annotations

import math

import numpy as np
import pytest

import edgemoe
from edgemoe.errors import EdgeMoEError
from edgemoe.units import parse_bytes

BAD = [
    ("memory_budget", math.nan, r"memory_budget=nan: .*finite"),
    ("memory_budget", math.inf, r"memory_budget=inf: .*finite"),
    ("memory_budget", -math.inf, r"memory_budget=-inf: .*finite"),
    ("memory_budget", -5, r"memory_budget=-5: .*positive"),
    ("memory_budget", 0, r"memory_budget=0: .*positive"),
    ("memory_budget", 0.5, r"memory_budget=0.5: .*positive"),
    ("memory_budget", "lots", r"memory_budget='lots': cannot read size"),
    ("memory_budget", "12 parsecs", r"memory_budget='12 parsecs': .*unknown unit"),
    ("memory_budget", "nan", r"memory_budget='nan': cannot read size"),
    ("memory_budget", True, r"memory_budget=True: expected a size"),
    ("memory_budget", [1], r"memory_budget=\[1\]: expected a size"),
    ("max_ctx", 0, r"max_ctx=0: expected a whole number in 1\.\.256"),
    ("max_ctx", -5, r"max_ctx=-5: expected a whole number in 1\.\.256"),
    ("max_ctx", 257, r"max_ctx=257: .*context length is 256"),
    ("max_ctx", 10**12, r"max_ctx=1000000000000: expected"),
    ("max_ctx", 64.0, r"max_ctx=64.0: expected a whole number"),
    ("max_ctx", "64", r"max_ctx='64': expected a whole number"),
    ("threads", 0, r"threads=0: expected a whole number in 1\.\.1024"),
    ("threads", -2, r"threads=-2: expected"),
    ("threads", 10**6, r"threads=1000000: expected"),
    ("threads", 2.5, r"threads=2.5: expected"),
    ("threads", True, r"threads=True: expected"),
    ("n_seq", 0, r"n_seq=0: expected a whole number in 1\.\.65536"),
    ("n_seq", -1, r"n_seq=-1: expected"),
    ("n_seq", 10**7, r"n_seq=10000000: expected"),
    ("precision", 0, r"precision=0 needs MWQ experts"),  # a float container: no planes to choose
    ("precision", True, r"precision=True: expected a whole number"),
    ("precision", math.nan, r"precision=nan .*needs MWQ experts"),
    ("mode", "fast", r"mode='fast': expected one of exact, adaptive, ondemand"),
    ("engine", "gpu", r"engine='gpu': expected one of auto, c, numpy"),
]


@pytest.mark.parametrize("option,value,match", BAD, ids=[f"{o}={v!r}" for o, v, _ in BAD])
def test_bad_option_is_one_clear_error_at_load(option, value, match, tiny_emoe):
    path = tiny_emoe("qwen3moe")  # max_position_embeddings 256
    with pytest.raises(EdgeMoEError, match=match) as info:
        edgemoe.load(path, **{option: value})
    assert "\n" not in str(info.value)


def test_good_options_still_load_and_agree(tiny_emoe):
    """The checks refuse nothing valid: NumPy integers, size strings, the full context and a budget all run, and the
    budgeted model computes the same logits."""
    path = tiny_emoe("qwen3moe")
    ids = [3, 17, 42, 99]
    with edgemoe.load(path, engine="numpy", max_ctx=np.int64(256), threads=np.int32(1)) as m:
        ref = m.logits(ids)
        assert m.max_ctx == 256
    with edgemoe.load(path, memory_budget="64MiB", max_ctx=32, threads=2, n_seq=2) as m:
        np.testing.assert_allclose(m.logits(ids), ref, rtol=1e-4, atol=1e-4)
    with edgemoe.load(path, memory_budget=64e6) as m:  # a float number of bytes
        assert m.memory_budget == 64_000_000


def test_parse_bytes_refuses_what_is_not_a_size():
    for bad in (math.nan, math.inf, -1.0, 0.2, True, "nan", "-5MB", "5 MB MB"):
        with pytest.raises(EdgeMoEError):
            parse_bytes(bad)
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("2GiB") == 2 * 1024**3
    assert parse_bytes(np.int64(4096)) == 4096
    assert parse_bytes("unlimited") is None and parse_bytes(None) is None


def test_cli_bad_threads_is_one_line(tiny_emoe, capsys):
    from edgemoe.cli import main

    rc = main(["run", str(tiny_emoe("qwen3moe")), "--prompt", "hi", "-n", "2", "--threads", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("edgemoe: error: threads=0"), err


def test_budget_only_options_without_a_budget_are_an_error_not_ignored(tiny_emoe):
    """kv_f16, direct, io_threads... act on the budgeted (streaming) engine only: without a budget they are refused
    by name instead of silently doing nothing."""
    path = tiny_emoe("olmoe", 16)
    with pytest.raises(EdgeMoEError, match="kv_f16.*memory budget"):
        edgemoe.load(path, kv_f16=True)
    with pytest.raises(EdgeMoEError, match="direct, io_threads"):
        edgemoe.load(path, io_threads=2, direct=False)
    with edgemoe.load(path, memory_budget="1GB", kv_f16=True) as m:  # with a budget they apply
        assert m.logits([1, 2, 3]).shape[0] == 3
