"""Every kernel of the C core, on every instruction set this machine runs, against the scalar reference and NumPy.

Float paths: normalized MSE (sum (a-b)^2 / sum b^2, as llama.cpp's test-backend-ops) <= 1e-7. Integer paths (the
Q8_0 dot products, the activation quantizer, f16 conversions): bit-exact. The scalar path is forced with
isa=ISA_SCALAR; SIMD paths not supported here (e.g. NEON on x86) are covered by native/tests/run_aarch64.sh.
"""

from __future__ import annotations

import importlib
import os
import zlib

import numpy as np
import pytest

N = importlib.import_module("edgemoe._native")

SIMD = [i for i in N.supported_isas() if i != N.ISA_SCALAR]
ALL = N.supported_isas()
WTYPES = {"f32": N.F32, "f16": N.F16, "q8_0": N.Q8_0, "q8_0_f32act": N.Q8_0 | N.MATMUL_F32_ACT}


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).sum() / max((b**2).sum(), 1e-300))


def stored(w: np.ndarray, wtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the bytes the kernel reads, the exact f32 values they hold)."""
    if wtype == "f32":
        return w, w
    if wtype == "f16":
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    q = N.quantize_q8_0(w)  # q8_0 and q8_0_f32act
    return q, N.dequantize_q8_0(q, w.shape)


def quantize_act_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documented activation quantizer: d = max|x|/127 (f32), q = round-half-even(x * f32(1/d))."""
    b = np.asarray(x, np.float32).reshape(-1, 32)
    d = (np.abs(b).max(1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    return d, np.rint(b * inv[:, None]).astype(np.int8)


SHAPES = [(1, 32), (5, 64), (17, 96), (33, 256), (64, 512), (7, 2048)]
TOKENS = [1, 2, 3, 4, 5, 8, 13]


@pytest.mark.parametrize("isa", SIMD, ids=N.isa_name)
@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_simd_matmul_matches_scalar(isa, wtype, shape):
    rng = np.random.default_rng(zlib.crc32(repr((wtype, shape)).encode()))
    rows, cols = shape
    if not wtype.startswith("q8_0"):
        cols += 5  # odd widths exercise the tails
    w, _ = stored(rng.standard_normal((rows, cols)).astype(np.float32), wtype)
    for t in TOKENS:
        x = rng.standard_normal((t, cols)).astype(np.float32)
        ref = N.matmul(w, WTYPES[wtype], x, rows, cols, isa=N.ISA_SCALAR)
        got = N.matmul(w, WTYPES[wtype], x, rows, cols, isa=isa)
        assert nmse(got, ref) <= 1e-7, (t, nmse(got, ref))


@pytest.mark.parametrize("isa", ALL, ids=N.isa_name)
@pytest.mark.parametrize("wtype", WTYPES)
def test_matmul_matches_numpy(isa, wtype):
    """f32/f16/q8_0_f32act: the exact product of the stored values; Q8_0: of the stored weights and the quantized
    activations."""
    rng = np.random.default_rng(7)
    rows, cols, t = 45, 320, 6
    w, wf = stored(rng.standard_normal((rows, cols)).astype(np.float32), wtype)
    x = rng.standard_normal((t, cols)).astype(np.float32)
    xe = x.astype(np.float64)
    if wtype == "q8_0":
        d, q = quantize_act_numpy(x)
        xe = (q.astype(np.float64) * d[:, None]).reshape(t, cols)
    exact = xe @ wf.astype(np.float64).T
    got = N.matmul(w, WTYPES[wtype], x, rows, cols, isa=isa)
    assert nmse(got, exact) <= 1e-12


@pytest.mark.parametrize("isa", ALL, ids=N.isa_name)
def test_q8_0_integer_accumulation_is_exact(isa):
    """With every scale 1 the Q8_0 matmul sums integer products only (|sum| < 2^24 keeps every f32 step exact), so
    any accumulation order must give the exact integer result: this pins the int8 dot products bit for bit,
    including weight code -128 (ggml files may hold it; our quantizer never writes it)."""
    rng = np.random.default_rng(3)
    rows, cols = 11, 1024  # 1024 * 128 * 127 < 2^24
    blocks = np.zeros(rows * cols // 32, dtype=[("d", "<f2"), ("qs", "i1", (32,))])
    blocks["d"] = 1.0
    blocks["qs"] = rng.integers(-128, 128, (blocks.size, 32))
    w = blocks.view(np.uint8)
    for t in (1, 2, 3, 4, 5, 6, 9):
        x = rng.integers(-127, 128, (t, cols)).astype(np.float32)
        x[:, ::32] = 127.0  # every block's max |x| is 127: d = 1 and the quantization is the identity
        exact = x.astype(np.int64) @ blocks["qs"].reshape(rows, cols).astype(np.int64).T
        got = N.matmul(w, N.Q8_0, x, rows, cols, isa=isa)
        assert np.array_equal(got, exact.astype(np.float32)), t


@pytest.mark.parametrize("isa", ALL, ids=N.isa_name)
def test_quantize_act_is_exact(isa):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(32 * 40) * 3).astype(np.float32)
    x[32:64] = 0.0  # an all-zero block
    x[64:96] = (np.arange(32) - 16) * 0.5  # ties: x/d lands on k + 0.5
    x[64] = 127 * 0.5
    got = N.quantize_act(x, isa)
    d, q = quantize_act_numpy(x)
    assert np.array_equal(got["d"], d) and np.array_equal(got["qs"], q)
    assert got["qs"].min() >= -127
    scalar = N.quantize_act(x, N.ISA_SCALAR)
    assert got.tobytes() == scalar.tobytes()


@pytest.mark.parametrize("isa", ALL, ids=N.isa_name)
def test_f16_conversions_are_exact(isa):
    every_half = np.arange(65536, dtype=np.uint16).view(np.float16)
    got = N.convert_f16(every_half, isa)
    ref = every_half.astype(np.float32)
    assert np.array_equal(got, ref, equal_nan=True)
    rng = np.random.default_rng(9)
    f = np.concatenate([
        (rng.standard_normal(50000) * np.exp2(rng.integers(-26, 17, 50000))).astype(np.float32),
        np.array([65504, 65519, 65520, 1e9, -1e9, 0.0, -0.0, 2.0**-25, 3 * 2.0**-26, 2.0**-24 * 1.5], np.float32),
        every_half.astype(np.float32)[np.isfinite(every_half)] + np.float32(0),
    ])
    with np.errstate(over="ignore"):
        ref16 = f.astype(np.float16)
    assert np.array_equal(N.convert_f16(f, isa).view(np.uint16), ref16.view(np.uint16))


@pytest.mark.parametrize("isa", ALL, ids=N.isa_name)
@pytest.mark.parametrize("xtype", [np.float32, np.float16])
def test_axpy(isa, xtype):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(203).astype(xtype)
    y0 = rng.standard_normal(203).astype(np.float32)
    got = N.axpy(0.625, x, y0.copy(), isa)
    ref = y0.astype(np.float64) + 0.625 * x.astype(np.float64)
    assert nmse(got, ref) <= 1e-12


@pytest.mark.parametrize("wtype", WTYPES)
def test_threaded_matmul_is_bit_identical(wtype):
    rng = np.random.default_rng(13)
    rows, cols = 301, 256
    w, _ = stored(rng.standard_normal((rows, cols)).astype(np.float32), wtype)
    for threads in (2, 3):
        pool = N.Pool(threads)
        for t in (1, 5, 64):
            x = rng.standard_normal((t, cols)).astype(np.float32)
            one = N.matmul(w, WTYPES[wtype], x, rows, cols)
            for _ in range(5):
                assert np.array_equal(N.matmul(w, WTYPES[wtype], x, rows, cols, pool=pool), one)
        pool.close()


def test_q8_0_quantizer_is_ggml_compatible():
    """Byte-identical to gguf-py's Q8_0 (a port of ggml's quantize_row_q8_0_ref), so GGUF export is a copy."""
    gguf = importlib.import_module("gguf")
    from gguf.quants import quantize

    rng = np.random.default_rng(17)
    w = (rng.standard_normal((24, 256)) * np.exp2(rng.integers(-8, 8, (24, 1)))).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = np.arange(32) - 16.0
    ref = quantize(w, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert N.quantize_q8_0(w).tobytes() == ref.tobytes()


def test_crc32_equals_zlib():
    rng = np.random.default_rng(19)
    for n in (0, 1, 3, 4096, 100_003):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert N.crc32(data) == zlib.crc32(data)
        assert N.crc32(data[n // 2:], N.crc32(data[: n // 2])) == zlib.crc32(data)
    assert N.crc32(b"123456789") == 0xCBF43926


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_avx512vnni_detected_when_the_cpu_has_it():
    """cpuid detection agrees with the kernel's view of the CPU; the AVX-512 kernels themselves are covered by every
    test parametrized over the supported ISAs."""
    flags = _cpu_flags()
    need = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    if not need <= flags:
        pytest.skip(f"this CPU lacks {sorted(need - flags)}: the avx512vnni kernels cannot run here")
    assert N.isa_supported(N.ISA_AVX512VNNI)
    assert N.isa_name(N.ISA_AVX512VNNI) == "avx512vnni"
    if "EDGEMOE_ISA" not in os.environ:
        assert N.isa_best() == N.ISA_AVX512VNNI


def test_isa_reporting():
    assert N.isa_supported(N.ISA_SCALAR)
    assert N.isa_best() in ALL
    assert N.isa_name(N.isa_best())
    assert not N.isa_supported(99)
    with pytest.raises(N.NativeError):
        N.matmul(np.zeros((1, 32), np.float32), N.F32, np.zeros(32, np.float32), 1, 32, isa=99)
