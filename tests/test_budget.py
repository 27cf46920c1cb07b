"""The hard memory budget (issue 6): the streaming engine against the all-resident model, budget accounting, errors.

Containers are written directly from random weights (tiny shapes from test_native_forward's SPECS), so every test
is fast. A budget equal to the minimum leaves room for one layer's top-k experts only: every layer evicts the
previous layer's experts, so every token reads every expert it uses from the file.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from subprocess_python import PYTHON

N = importlib.import_module("edgemoe._native")
if not hasattr(N, "open_streaming"):
    pytest.skip("this build of the C core has no streaming engine", allow_module_level=True)

from test_native_forward import SPECS, random_tensors, tensor_shapes

import edgemoe
from edgemoe.arch import ArchSpec
from edgemoe.container import ContainerWriter, open_container
from edgemoe.errors import EdgeMoEError, FormatError

ROOT = Path(__file__).resolve().parents[1]


def write_container(path: Path, spec: ArchSpec, tensors: dict, expert_dtype: str = "f32", dense_dtype: str = "f32",
                    group_size: int = 16) -> Path:
    """Dense tensors first, then every expert matrix (f32 / f16 / q8_0, or MWQ-4 planes: 2-bit base + 2 residual)."""
    def encode(a: np.ndarray, dtype: str):
        if a.ndim == 1 or dtype == "f32":
            return a.astype(np.float32), "f32"
        if dtype == "f16" or a.shape[1] % 32:  # q8_0 needs whole blocks of 32 (the exporter's fallback too)
            return a.astype(np.float16), "f16"
        return N.quantize_q8_0(a), "q8_0"

    with ContainerWriter(path, spec, {"source": "test_budget"}) as w:
        for name, a in tensors.items():
            if ".expert." not in name:
                data, dt = encode(a, dense_dtype)
                w.add_tensor(name, data, dt, shape=a.shape)
        for name, a in tensors.items():
            if ".expert." not in name:
                continue
            if expert_dtype == "mwq":
                from edgemoe_export.mwq import quantize_matrix

                q = quantize_matrix(a, None, base_bits=2, total_bits=4, group_size=group_size, nesting="msb")
                w.add_planes(name, q.planes, a.shape, kind="expert", quant=q.quant_params())
            else:
                data, dt = encode(a, expert_dtype)
                w.add_tensor(name, data, dt, shape=a.shape, kind="expert")
    return path


def minimum_budget(path: Path, max_ctx: int, threads: int = 1) -> int:
    """The minimum the engine states (it depends on max_ctx and on the threads: scratch and stacks)."""
    with pytest.raises(N.BudgetError) as e:
        edgemoe.load(path, memory_budget=1, max_ctx=max_ctx, threads=threads)
    msg = str(e.value)
    return int(msg.split("below the minimum ")[1].split("(")[1].split(" bytes")[0])


def greedy_logits(engine, ids, n: int) -> tuple[list[int], list[np.ndarray]]:
    logits = engine.prefill(ids)
    toks, outs = [], [logits.copy()]
    for _ in range(n):
        toks.append(int(np.argmax(logits)))
        logits = engine.decode(toks[-1])
        outs.append(logits.copy())
    return toks, outs


CASES = [(name, "f32") for name in sorted(SPECS)] + [("olmoe", "f16"), ("olmoe", "q8_0"), ("olmoe", "mwq"),
                                                      ("qwen3moe", "mwq"), ("merged", "mwq")]


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    cache = {}

    def get(spec_name: str, expert_dtype: str = "f32", dense_dtype: str = "f32") -> Path:
        key = (spec_name, expert_dtype, dense_dtype)
        if key not in cache:
            spec = SPECS[spec_name]
            cache[key] = write_container(root / f"{spec_name}_{expert_dtype}_{dense_dtype}.emoe", spec,
                                         random_tensors(spec), expert_dtype, dense_dtype)
        return cache[key]

    return get


@pytest.mark.parametrize("spec_name,expert_dtype", CASES)
def test_exact_mode_is_bit_identical_to_all_resident_under_eviction(containers, spec_name, expert_dtype):
    path = containers(spec_name, expert_dtype)
    ids = np.random.default_rng(3).integers(0, SPECS[spec_name].vocab, 70).tolist()  # > one 64-token block
    with edgemoe.load(path, max_ctx=128, threads=2) as ref:
        assert ref.engine_name == "c"
        toks_ref, logits_ref = greedy_logits(ref._engine, ids, 12)
    budget = minimum_budget(path, 128, threads=2)
    with edgemoe.load(path, memory_budget=budget, max_ctx=128, threads=2) as m:
        assert m.engine_name == "c-stream"
        toks, logits = greedy_logits(m._engine, ids, 12)
        st = m.stats
    assert toks == toks_ref
    for a, b in zip(logits, logits_ref):
        np.testing.assert_array_equal(a, b)  # the same additions in the same order: bit for bit
    spec = SPECS[spec_name]
    n_moe = sum(spec.is_moe_layer(layer) for layer in range(spec.n_layers))
    assert st["evictions"] >= 12 * n_moe  # every decoded token evicted in every MoE layer
    assert st["bytes_read_per_token"] > 0 and sum(st["misses_per_plane"]) + sum(st["late_prefetch_per_plane"]) > 0
    assert st["expert_cache_peak_bytes"] <= st["budget_parts"]["expert_cache"]
    assert sum(st["budget_parts"].values()) <= budget


@pytest.mark.parametrize("mode,prefetch", [("exact", 0), ("exact", 2), ("ondemand", 0)])
def test_every_schedule_gives_the_same_logits(containers, mode, prefetch):
    path = containers("olmoe", "mwq")
    ids = np.random.default_rng(4).integers(0, 96, 20).tolist()
    with edgemoe.load(path, max_ctx=64) as ref:
        toks_ref, logits_ref = greedy_logits(ref._engine, ids, 10)
    budget = minimum_budget(path, 64) + 20_000
    with edgemoe.load(path, memory_budget=budget, max_ctx=64, mode=mode, prefetch=prefetch) as m:
        toks, logits = greedy_logits(m._engine, ids, 10)
        st = m.stats
    assert toks == toks_ref
    for a, b in zip(logits, logits_ref):
        np.testing.assert_array_equal(a, b)
    if prefetch:
        assert st["prefetch_recall"] is not None and st["prefetch_pieces"]["issued"] > 0
    assert st["mode"] == mode


def test_q8_dense_and_precision_streaming_matches_resident(containers):
    path = containers("qwen2moe", "mwq", "q8_0")
    ids = np.random.default_rng(5).integers(0, 96, 16).tolist()
    for k in (1, 2):
        with edgemoe.load(path, max_ctx=64, precision=k) as ref:
            _, logits_ref = greedy_logits(ref._engine, ids, 6)
        with edgemoe.load(path, memory_budget=minimum_budget(path, 64), max_ctx=64, precision=k) as m:
            _, logits = greedy_logits(m._engine, ids, 6)
            st = m.stats
        for a, b in zip(logits, logits_ref):
            np.testing.assert_array_equal(a, b)
        assert len(st["experts_at_planes"]) == k and st["experts_at_planes"][-1] > 0
        assert sum(st["hits_per_plane"][k:]) + sum(st["misses_per_plane"][k:]) == 0  # planes > k never read


def test_adaptive_mode_runs_and_matches_exact_once_everything_is_resident(containers):
    path = containers("olmoe", "mwq")
    ids = np.random.default_rng(6).integers(0, 96, 12).tolist()
    with edgemoe.load(path, memory_budget=minimum_budget(path, 64), max_ctx=64, mode="adaptive") as m:
        toks, _ = greedy_logits(m._engine, ids, 8)
        st = m.stats
    assert len(toks) == 8
    assert sum(st["experts_at_planes"]) > 0 and len(st["experts_at_planes"]) == 3
    with edgemoe.load(path, max_ctx=64) as ref:
        _, logits_ref = greedy_logits(ref._engine, ids, 4)
    with edgemoe.load(path, max_ctx=64, mode="adaptive") as m:  # no budget: the cache keeps every piece
        # warm passes until one runs every expert at all its planes (some run at base precision while their
        # refinement planes are read: with O_DIRECT, the default, reads take the device's time, not the page cache's)
        for _ in range(50):
            m.reset_stats()
            greedy_logits(m._engine, ids, 4)
            m._engine.reset()
            if not any(m.stats["experts_at_planes"][:-1]):
                break
        _, logits = greedy_logits(m._engine, ids, 4)
    for a, b in zip(logits, logits_ref):
        np.testing.assert_array_equal(a, b)


def test_budget_below_the_minimum_is_refused_with_the_minimum(containers):
    path = containers("qwen2moe", "f16")
    with pytest.raises(EdgeMoEError) as e:
        edgemoe.load(path, memory_budget="100KB", max_ctx=256)
    msg = str(e.value)
    assert "below the minimum" in msg and "dense weights" in msg and "KV cache" in msg and "expert cache" in msg
    minimum = minimum_budget(path, 256)
    assert f"({minimum} bytes)" in msg
    with pytest.raises(N.BudgetError):
        edgemoe.load(path, memory_budget=minimum - 1, max_ctx=256)
    with edgemoe.load(path, memory_budget=minimum, max_ctx=256) as m:  # exactly the minimum runs
        assert m.stats["minimum_budget_bytes"] == minimum
        m._engine.prefill([1, 2, 3])
    # a longer context needs more KV cache: the minimum grows
    assert minimum_budget(path, 1024) > minimum


def test_numpy_engine_cannot_take_a_budget(containers):
    with pytest.raises(EdgeMoEError, match="needs the C engine"):
        edgemoe.load(containers("olmoe"), memory_budget="1GB", engine="numpy")


# ---- subprocess tests: RSS, corrupt and unreadable files (a crash or a hang fails them, never the test run) ----

def _big_spec() -> ArchSpec:
    """Experts are most of the file (48 x 1.5 MB f32), dense weights about 7 MB."""
    return ArchSpec("olmoe", n_layers=6, hidden=256, vocab=512, n_heads=4, n_kv_heads=4, head_dim=64, n_experts=8,
                    top_k=2, expert_ffn=512, qk_norm="full")


def _big_tensors(spec: ArchSpec) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in tensor_shapes(spec).items():
        a = (1.0 + 0.1 * rng.standard_normal(shape)) if len(shape) == 1 else \
            rng.standard_normal(shape, dtype=np.float32) * (1.5 / np.sqrt(shape[1]))
        out[name] = np.asarray(a, dtype=np.float32)
    return out


@pytest.fixture(scope="module")
def big_container(tmp_path_factory):
    spec = _big_spec()
    return write_container(tmp_path_factory.mktemp("big") / "big.emoe", spec, _big_tensors(spec))


def _run(code: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    # The child imports edgemoe as this process does (the installed package, or PYTHONPATH in development); its
    # cwd is not the repository, whose source tree has no compiled core.
    p = subprocess.run([*PYTHON, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, cwd=tempfile.gettempdir(), check=False, env=env)
    assert p.returncode == 0, f"child failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


_PRELUDE = """
    import json, os, sys
    import numpy as np
    import edgemoe
    from edgemoe import _native as N

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def greedy(eng, ids, n):
        logits = eng.prefill(ids)
        toks = []
        for _ in range(n):
            toks.append(int(np.argmax(logits)))
            logits = eng.decode(toks[-1])
        return toks
"""


def test_rss_growth_stays_within_the_budget(big_container):
    budget = 24_000_000
    size = big_container.stat().st_size
    assert size > 3 * budget  # an unbounded cache (or mapping the file) would blow through the budget
    p = _run(_PRELUDE + f"""
    path, budget = {str(big_container)!r}, {budget}
    before = status("VmRSS")
    m = edgemoe.load(path, memory_budget=budget, max_ctx=256, threads=2, prefetch=2)
    greedy(m._engine, list(range(1, 40)), 40)
    st = m.stats
    print(json.dumps({{"before": before, "hwm": status("VmHWM"), "stats": st}}))
    """)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    growth = out["hwm"] - out["before"]
    st = out["stats"]
    assert st["evictions"] > 0 and st["bytes_read"] > budget  # it really streamed
    assert st["expert_cache_peak_bytes"] <= st["budget_parts"]["expert_cache"]
    assert growth <= budget * 1.05, f"RSS grew by {growth} bytes under a budget of {budget}"


def test_corrupt_plane_mid_generation_raises_a_clear_error(big_container, tmp_path):
    path = tmp_path / "corrupt.emoe"
    path.write_bytes(big_container.read_bytes())
    c = open_container(path, verify=False)
    offsets = [t.offset + t.nbytes // 2 for t in c.tensors.values() if t.kind == "expert"]
    c.close()
    p = _run(_PRELUDE + f"""
    path, offsets = {str(path)!r}, {offsets}
    m = edgemoe.load(path, memory_budget=18_000_000, max_ctx=256, verify_reads="always")
    eng = m._engine
    toks = greedy(eng, [1, 2, 3, 4], 4)  # fine so far
    with open(path, "r+b") as f:  # damage every expert matrix while the model is open
        for off in offsets:
            f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x5A]))
    try:
        for _ in range(8):
            eng.decode(toks[-1])
    except edgemoe.errors.FormatError as e:
        assert isinstance(e, N.CorruptWeightsError) and e.status == N.ERR_CORRUPT, repr(e)
        print("RAISED", e)
    else:
        raise SystemExit("no error")
    """)
    msg = p.stdout
    assert "RAISED" in msg and "checksum mismatch" in msg and "plane 1 of tensor 'blk." in msg, msg


def test_corrupt_file_is_reported_at_first_read_by_default(big_container, tmp_path):
    path = tmp_path / "corrupt_first.emoe"
    data = bytearray(big_container.read_bytes())
    c = open_container(big_container, verify=False)
    t = c.tensors["blk.0.expert.0.ffn_up.weight"]
    data[t.offset + 10] ^= 0xFF
    c.close()
    path.write_bytes(bytes(data))
    # only the index is read at load; whichever token routes to expert 0 of layer 0 reads it
    with edgemoe.load(path, memory_budget=18_000_000, max_ctx=128) as m, \
            pytest.raises(FormatError, match=r"checksum mismatch.*blk\.0\.expert\.0\.ffn_up\.weight"):
        for _ in range(4):
            m._engine.prefill(list(range(0, 256, 3)))


def test_unreadable_file_mid_generation_raises_and_recovers(big_container, tmp_path):
    path = tmp_path / "trunc.emoe"
    path.write_bytes(big_container.read_bytes())
    c = open_container(path, verify=False)
    cut = min(t.offset for t in c.tensors.values() if t.kind == "expert") + 4096
    c.close()
    p = _run(_PRELUDE + f"""
    path, cut = {str(path)!r}, {cut}
    original = open(path, "rb").read()
    m = edgemoe.load(path, memory_budget=18_000_000, max_ctx=256)
    eng = m._engine
    toks = greedy(eng, [5, 6, 7], 3)
    os.truncate(path, cut)  # the file loses its experts under the running model
    try:
        for _ in range(8):
            eng.decode(toks[-1])
    except N.ReadError as e:
        assert e.status == N.ERR_IO
        print("RAISED", e)
    else:
        raise SystemExit("no error")
    open(path, "wb").write(original)  # put it back: the same model reads again (the failed pieces are retried)
    eng.prefill([5, 6, 7])
    eng.decode(toks[0])
    print("RECOVERED")
    """)
    assert "RAISED" in p.stdout and "short read" in p.stdout and "truncated" in p.stdout, p.stdout
    assert "RECOVERED" in p.stdout


def test_stats_report_the_streaming_engine(big_container):
    """m.stats (what `edgemoe run --json` prints) carries the C core's statistics."""
    with edgemoe.load(big_container, memory_budget="30MB", max_ctx=64) as m:
        m.generate([1, 2, 3], max_new_tokens=5, stop_at_eos=False)
        st = m.stats
    for key in ("cache_hit_rate", "bytes_read_per_token", "io_stall_s", "io_stall_fraction", "prefetch_recall",
                "prefetch_precision", "peak_rss_bytes", "hits_per_plane", "misses_per_plane", "minimum_budget_bytes",
                "budget_parts", "decode_tok_s", "read_mode", "read_note"):
        assert key in st, key
    # 5 new tokens: the prompt's prefill gives the first, 4 decodes the rest (the last token is never run)
    assert st["engine"] == "c-stream" and st["decode_tokens"] == 4 and st["tokens"] == 7
    assert 0.0 <= st["cache_hit_rate"] <= 1.0 and st["bytes_read"] > 0
    json.dumps(st)  # serializable, as `edgemoe run --json` prints it


def _fs_allows_o_direct(path: Path) -> bool:
    """What io_thread.c's probe finds: an O_DIRECT open and one aligned read succeed."""
    import mmap
    import os

    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _read_mode(path: Path, **opts) -> tuple[str, str | None]:
    with edgemoe.load(path, memory_budget=minimum_budget(path, 64), max_ctx=64, **opts) as m:
        m.generate([1, 2, 3], max_new_tokens=3, stop_at_eos=False)
        assert m.stats["bytes_read"] > 0
        return m.stats["read_mode"], m.stats["read_note"]


def test_budget_reads_o_direct_by_default_and_says_when_it_cannot(containers, tmp_path):
    """Under a budget the default is O_DIRECT where the file system allows it; where it refuses, buffered reads whose
    pages are dropped after use, and stats say so and why (no silent switch)."""
    path = containers("olmoe")
    mode, note = _read_mode(path)
    if _fs_allows_o_direct(path):
        assert (mode, note) == ("O_DIRECT", None)
    else:
        assert mode == "buffered, pages dropped after use" and "O_DIRECT" in note
    assert _read_mode(path, direct=False) == ("buffered, pages dropped after use", None)
    assert _read_mode(path, direct=False, drop_cache=False) == ("buffered", None)


# A file system that refuses O_DIRECT, simulated: open() with O_DIRECT fails with EINVAL (as on tmpfs before Linux 6.6).
_NO_DIRECT_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
static int refuse(const char *name, const char *path, int flags, mode_t mode) {
    if (flags & O_DIRECT) { errno = EINVAL; return -1; }
    int (*real)(const char *, int, ...) = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, name);
    return real(path, flags, mode);
}
#define SHIM(NAME) int NAME(const char *p, int f, ...) { va_list a; va_start(a, f); mode_t m = (f & O_CREAT) ? \
    va_arg(a, mode_t) : 0; va_end(a); return refuse(#NAME, p, f, m); }
SHIM(open)
SHIM(open64)
"""


def test_refused_o_direct_falls_back_to_dropped_buffered_reads_and_says_so(containers, tmp_path):
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build the O_DIRECT-refusing shim")
    (tmp_path / "shim.c").write_text(_NO_DIRECT_SHIM)
    lib = tmp_path / "noodirect.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "shim.c"), "-ldl"], check=True)
    path = containers("olmoe")
    p = _run(_PRELUDE + f"""
    with edgemoe.load({str(path)!r}, memory_budget={minimum_budget(path, 64)}, max_ctx=64) as m:
        m.generate([1, 2, 3], max_new_tokens=3, stop_at_eos=False)
        assert m.stats["bytes_read"] > 0
        print("MODE", m.stats["read_mode"], "|", m.stats["read_note"])
    """, env={**os.environ, "LD_PRELOAD": str(lib)})
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("MODE"))
    assert line.startswith("MODE buffered, pages dropped after use | O_DIRECT refused by the file system (Invalid "
                           "argument)"), line


def test_every_native_status_has_its_own_message():
    """The streaming statuses (-7 I/O, -8 checksum, -9 budget) reach Python with their own text, not "unknown"."""
    from edgemoe import _native

    codes = [_native.OK, _native.ERR_ARG, _native.ERR_NOMEM, _native.ERR_NOT_READY, _native.ERR_CTX, _native.ERR_ISA,
             _native.ERR_THREAD, _native.ERR_IO, _native.ERR_CORRUPT, _native.ERR_BUDGET, _native.ERR_FORMAT,
             _native.ERR_INVALID]
    assert codes == list(range(0, -12, -1))
    messages = [_native.status_string(c) for c in codes]
    assert "unknown error" not in messages
    assert len(set(messages)) == len(messages)
    assert "CRC-32" in _native.status_string(_native.ERR_CORRUPT)
    assert "budget" in _native.status_string(_native.ERR_BUDGET)
    assert _native.status_string(-12) == "unknown error"


def test_corrupt_tokenizer_is_refused_under_a_budget(tiny_emoe, tmp_path):
    """The tokenizer blob is read by Python, not by the C core: its checksum is checked at load, budget or not."""
    src = tiny_emoe("olmoe")
    path = tmp_path / "bad_tokenizer.emoe"
    data = bytearray(src.read_bytes())
    c = open_container(src, verify=False)
    t = c.tensors["tokenizer.json"]
    c.close()
    data[t.offset + t.nbytes // 2] ^= 0x01
    path.write_bytes(bytes(data))
    for budget in (None, "1GB"):
        with pytest.raises(FormatError, match="tokenizer.json"):
            edgemoe.load(path, memory_budget=budget, max_ctx=64)
