"""Private ctypes binding of the C core (`native/include/edgemoe.h`): library lookup, argtypes, errors -> exceptions.

Thin on purpose: one Python function per C function, numpy arrays passed by pointer without copies. The friendly
surface is `engine_c.CEngine`. The shared library is looked up in this order:

1. `EDGEMOE_NATIVE_LIB`: a path to the library file, or a directory containing it (a development CMake build dir);
2. next to this file (where scikit-build-core installs it).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import CorruptFileError, EdgeMoEError, FileReadError, FormatError, InvalidFileError, NotAContainerError

_LIB_NAMES = {"darwin": "libedgemoe_core.dylib", "win32": "edgemoe_core.dll"}
LIB_NAME = _LIB_NAMES.get(sys.platform, "libedgemoe_core.so")

# status codes (emoe_status)
OK, ERR_ARG, ERR_NOMEM, ERR_NOT_READY, ERR_CTX, ERR_ISA, ERR_THREAD = 0, -1, -2, -3, -4, -5, -6
# weight types
F32, F16, Q8_0 = 0, 1, 2
MATMUL_F32_ACT = 0x100  # or-ed into a Q8_0 wtype for emoe_matmul: keep activations f32 (exact path)
DTYPES = {"f32": F32, "f16": F16, "q8_0": Q8_0}
Q8_0_BLOCK, Q8_0_BLOCK_BYTES = 32, 34
MWQ_NO_LUT = 0x200  # EMOE_MWQ_NO_LUT: or'ed into base_bits
MWQ_MAX_PLANES = 8  # EMOE_MWQ_MAX_PLANES: MWQ expert matrices (bit planes) go through set_expert_mwq / matmul_mwq
# instruction sets
ISA_AUTO, ISA_SCALAR, ISA_AVX2, ISA_NEON, ISA_NEON_DOTPROD, ISA_AVX512VNNI, ISA_COUNT = -1, 0, 1, 2, 3, 4, 5


class NativeLibraryNotFound(ImportError, EdgeMoEError):
    """The C core is not built: an ImportError (the module cannot load) that users see as one clear EdgeMoEError."""


class NativeError(EdgeMoEError):
    """An error returned by the C core; `status` is the emoe_status code."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _find_library() -> Path:
    tried = []
    env = os.environ.get("EDGEMOE_NATIVE_LIB")
    if env:
        p = Path(env)
        p = p / LIB_NAME if p.is_dir() else p
        if p.is_file():
            return p
        tried.append(str(p))
    # Beside this file (an installed package), or in another directory of the package: an editable install
    # (pip install -e .) imports the sources from the checkout and lists the directory CMake installed into too.
    package = sys.modules[__package__]
    for d in dict.fromkeys([str(Path(__file__).resolve().parent), *getattr(package, "__path__", ())]):
        p = Path(d) / LIB_NAME
        if p.is_file():
            return p
        tried.append(str(p))
    here = Path(__file__).resolve().parent
    # The commonest cause after `pip install .`: Python started in the checkout imports its edgemoe/ (no core).
    checkout = (f" This edgemoe is the source tree in {here.parent}; after `pip install .` run from another "
                "directory, or install with `pip install -e .`."
                if (here.parent / "native" / "CMakeLists.txt").is_file() else "")
    raise NativeLibraryNotFound(
        f"edgemoe's C core ({LIB_NAME}) was not found (tried: {', '.join(tried)}).{checkout} Install the package "
        "with pip (it builds native/ with CMake), or build it yourself (cmake -S native -B build && cmake --build "
        "build) and set EDGEMOE_NATIVE_LIB=build/" + LIB_NAME
    )


_lib = ctypes.CDLL(str(_find_library()))
LIB_PATH = _lib._name

_i32, _i64, _f32, _u32, _sz, _vp, _cp = (ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_uint32,
                                         ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p)
_int = ctypes.c_int
_P_i32 = ctypes.POINTER(ctypes.c_int32)


def _sig(name, restype, *argtypes):
    f = getattr(_lib, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


_version = _sig("emoe_version", _cp)
_status_string = _sig("emoe_status_string", _cp, _int)
_crc32 = _sig("emoe_crc32", _u32, _u32, _vp, _sz)
_row_bytes = _sig("emoe_row_bytes", _sz, _int, _i64)
_quantize_q8_0 = _sig("emoe_quantize_q8_0", _int, _vp, _vp, _i64)
_dequantize_q8_0 = _sig("emoe_dequantize_q8_0", _int, _vp, _vp, _i64)
_isa_supported = _sig("emoe_isa_supported", _int, _int)
_isa_best = _sig("emoe_isa_best", _int)
_isa_name = _sig("emoe_isa_name", _cp, _int)
_pool_new = _sig("emoe_pool_new", _vp, _int)
_pool_free = _sig("emoe_pool_free", None, _vp)
_matmul = _sig("emoe_matmul", _int, _vp, _int, _int, _vp, _i64, _i64, _vp, _i64, _vp)
_quantize_act = _sig("emoe_quantize_act", _int, _int, _vp, _vp, _i64)
_axpy = _sig("emoe_axpy", _int, _int, _int, _f32, _vp, _vp, _i64)
_convert_f16 = _sig("emoe_convert_f16", _int, _int, _int, _vp, _vp, _i64)
_mwq_plane_bytes = _sig("emoe_mwq_plane_bytes", _i64, _int, _int, _int, _i64, _i64)
_mwq_lut_available = _sig("emoe_mwq_lut_available", _int, _int)
_matmul_mwq = _sig("emoe_matmul_mwq", _int, _vp, _int, _vp, _vp, _int, _int, _int, _i64, _i64, _vp, _i64, _vp)
_model_new_json = _sig("emoe_model_new_json", _vp, _cp, _sz, _int, _int, _int, ctypes.POINTER(_int), _cp, _sz)
_arch_check = _sig("emoe_arch_check", _int, _cp, _sz, _cp, _sz)
_model_free = _sig("emoe_model_free", None, _vp)
_model_status = _sig("emoe_model_status", _int, _vp)
_model_last_error = _sig("emoe_model_last_error", _cp, _vp)
_model_set_tensor = _sig("emoe_model_set_tensor", _int, _vp, _cp, _int, _vp, _i64, _i64)
_model_expected_shape = _sig("emoe_model_expected_shape", _int, _vp, _cp, ctypes.POINTER(_i64), ctypes.POINTER(_i64))
_model_ready = _sig("emoe_model_ready", _int, _vp)
_model_set_isa = _sig("emoe_model_set_isa", _int, _vp, _int)
_model_set_q8_f32_act = _sig("emoe_model_set_q8_f32_act", _int, _vp, _int)
_model_set_expert_mwq = _sig("emoe_model_set_expert_mwq", _int, _vp, _cp, _vp, _vp, _int, _int, _int, _i64, _i64)
_model_set_precision = _sig("emoe_model_set_precision", _int, _vp, _int)
_model_precision = _sig("emoe_model_precision", _int, _vp)
_model_isa = _sig("emoe_model_isa", _int, _vp)
_forward = _sig("emoe_forward", _int, _vp, _vp, _int, _vp, _int)
_model_n_past = _sig("emoe_model_n_past", _int, _vp)
_model_reset = _sig("emoe_model_reset", None, _vp)
_model_truncate = _sig("emoe_model_truncate", _int, _vp, _int)
_model_set_n_seq = _sig("emoe_model_set_n_seq", _int, _vp, _int)
_model_n_seq = _sig("emoe_model_n_seq", _int, _vp)
_forward_seq = _sig("emoe_forward_seq", _int, _vp, _int, _vp, _int, _vp, _int)
_forward_batch = _sig("emoe_forward_batch", _int, _vp, _vp, _vp, _int, _vp)
_model_seq_n_past = _sig("emoe_model_seq_n_past", _int, _vp, _int)
_model_truncate_seq = _sig("emoe_model_truncate_seq", _int, _vp, _int, _int)
_model_reset_seq = _sig("emoe_model_reset_seq", None, _vp, _int)

# The activation block of the Q8_0 matmul path: {float d; int8 qs[32]} (36 bytes).
Q8_ACT_DTYPE = np.dtype([("d", "<f4"), ("qs", "i1", (32,))])


def version() -> str:
    return _version().decode()


def status_string(status: int) -> str:
    return _status_string(status).decode()


def _check(status: int, what: str) -> None:
    if status != OK:
        raise NativeError(f"{what}: {status_string(status)}", status)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def crc32(data, crc: int = 0) -> int:
    """zlib-compatible CRC-32 of a bytes-like object or an array (continuing from `crc`)."""
    if isinstance(data, np.ndarray):
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    return int(_crc32(crc, _ptr(buf) if buf.size else None, buf.size))


def isa_supported(isa: int) -> bool:
    return bool(_isa_supported(isa))


def isa_best() -> int:
    return int(_isa_best())


def isa_name(isa: int) -> str | None:
    n = _isa_name(isa)
    return n.decode() if n else None


def supported_isas() -> list[int]:
    return [i for i in range(ISA_COUNT) if isa_supported(i)]


def row_bytes(dtype: int, cols: int) -> int:
    return int(_row_bytes(dtype, cols))


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """f32 [..., n] (n % 32 == 0) -> raw Q8_0 blocks (uint8), exactly ggml's reference quantizer."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    out = np.empty(w.size // Q8_0_BLOCK * Q8_0_BLOCK_BYTES, dtype=np.uint8)
    _check(_quantize_q8_0(_ptr(w), _ptr(out), w.size), "quantize_q8_0")
    return out


def dequantize_q8_0(raw: np.ndarray, shape) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty(shape, dtype=np.float32)
    if raw.size != out.size // Q8_0_BLOCK * Q8_0_BLOCK_BYTES:
        raise ValueError(f"{raw.size} bytes of Q8_0 do not hold shape {tuple(shape)}")
    _check(_dequantize_q8_0(_ptr(raw), _ptr(out), out.size), "dequantize_q8_0")
    return out


class Pool:
    """A persistent thread pool (for the kernel entry points; each model owns its own)."""

    def __init__(self, threads: int):
        self._p = _pool_new(int(threads))
        if not self._p:
            raise NativeError(f"could not start a pool of {threads} threads", ERR_THREAD)
        self.threads = int(threads)

    def close(self) -> None:
        if getattr(self, "_p", None):
            _pool_free(self._p)
            self._p = None

    def __del__(self):
        self.close()


def matmul(w: np.ndarray, wtype: int, x: np.ndarray, rows: int, cols: int, isa: int = ISA_AUTO,
           pool: Pool | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Y [n_tok, rows] = X [n_tok, cols] @ W^T, W stored as wtype (f32/f16 [rows, cols] or raw Q8_0 bytes)."""
    w = np.ascontiguousarray(w)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, cols)
    if w.nbytes != rows * row_bytes(wtype & ~MATMUL_F32_ACT, cols):
        raise ValueError(f"weights of {w.nbytes} bytes do not match [{rows}, {cols}] of type {wtype}")
    y = np.empty((x.shape[0], rows), dtype=np.float32) if out is None else out
    if y.dtype != np.float32 or not y.flags.c_contiguous or y.size != x.shape[0] * rows:
        raise ValueError("out must be a C-contiguous float32 array of n_tok * rows values")
    _check(_matmul(pool._p if pool else None, isa, wtype, _ptr(w), rows, cols, _ptr(x), x.shape[0], _ptr(y)),
           "matmul")
    return y


def mwq_lut_available(isa: int = ISA_AUTO) -> bool:
    """True if matmul_mwq on this ISA uses the table-lookup kernels (base_bits 2, group % 32 == 0)."""
    return bool(_mwq_lut_available(isa))


def mwq_plane_bytes(plane: int, base_bits: int, group: int, rows: int, cols: int) -> int:
    """Bytes of MWQ plane `plane` (1 = base) of a [rows, cols] matrix, scales included (0 if invalid)."""
    return int(_mwq_plane_bytes(plane, base_bits, group, rows, cols))


def plane_offsets(planes) -> tuple[np.ndarray, np.ndarray]:
    """(base array, int64 offsets) for a list of plane byte arrays: plane p at base.ctypes.data + offsets[p-1]. The
    arrays are used in place (keep them alive while the C side may read them)."""
    planes = [np.asarray(p) for p in planes]
    if not planes or any(not p.flags.c_contiguous for p in planes):
        raise ValueError("planes must be a non-empty list of C-contiguous arrays")
    base = planes[0]
    return base, np.array([p.ctypes.data - base.ctypes.data for p in planes], dtype=np.int64)


def matmul_mwq(planes, k: int, base_bits: int, group: int, x: np.ndarray, rows: int, cols: int,
               isa: int = ISA_AUTO, pool: Pool | None = None, out: np.ndarray | None = None,
               f32_act: bool = False, lut: bool = True) -> np.ndarray:
    """Y [n_tok, rows] = X [n_tok, cols] @ W_hat_k^T straight from the bit planes (a list of the K plane byte arrays,
    of which the first k are read). f32_act: keep the activations f32 instead of int8 per block of 32. lut=False: not
    the table-lookup kernels (native/src/mwq_lut.h; used by default where the ISA has them) but the per-plane
    dot-product kernels."""
    planes = [np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in planes]
    if not 1 <= k <= len(planes):
        raise ValueError(f"k={k}: expected 1..{len(planes)}")
    for i, p in enumerate(planes[:k], start=1):
        if p.nbytes != mwq_plane_bytes(i, base_bits, group, rows, cols):
            raise ValueError(f"plane {i} has {p.nbytes} bytes, expected {mwq_plane_bytes(i, base_bits, group, rows, cols)}")
    base, offs = plane_offsets(planes)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, cols)
    y = np.empty((x.shape[0], rows), dtype=np.float32) if out is None else out
    if y.dtype != np.float32 or not y.flags.c_contiguous or y.size != x.shape[0] * rows:
        raise ValueError("out must be a C-contiguous float32 array of n_tok * rows values")
    bb = base_bits | (MATMUL_F32_ACT if f32_act else 0) | (0 if lut else MWQ_NO_LUT)
    _check(_matmul_mwq(pool._p if pool else None, isa, _ptr(base), _ptr(offs), k, bb, group, rows, cols, _ptr(x),
                       x.shape[0], _ptr(y)), "matmul_mwq")
    return y


def quantize_act(x: np.ndarray, isa: int = ISA_AUTO) -> np.ndarray:
    """The activation quantizer of the Q8_0 path: f32 [n] -> structured blocks (d f32, qs int8[32])."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(x.size // 32, dtype=Q8_ACT_DTYPE)
    _check(_quantize_act(isa, _ptr(x), _ptr(out), x.size), "quantize_act")
    return out


def axpy(a: float, x: np.ndarray, y: np.ndarray, isa: int = ISA_AUTO) -> np.ndarray:
    """y += a * x in place (x f32 or f16, y f32 contiguous)."""
    x = np.ascontiguousarray(x)
    xtype = F16 if x.dtype == np.float16 else F32
    x = x if xtype == F16 else x.astype(np.float32, copy=False)
    if y.dtype != np.float32 or not y.flags.c_contiguous or y.size != x.size:
        raise ValueError("y must be a C-contiguous float32 array of x.size values")
    _check(_axpy(isa, xtype, a, _ptr(x), _ptr(y), x.size), "axpy")
    return y


def convert_f16(x: np.ndarray, isa: int = ISA_AUTO) -> np.ndarray:
    """f32 -> f16, or f16 -> f32, with the given ISA's kernel."""
    x = np.ascontiguousarray(x)
    to_f16 = x.dtype != np.float16
    x = x.astype(np.float32, copy=False) if to_f16 else x
    out = np.empty(x.shape, dtype=np.float16 if to_f16 else np.float32)
    _check(_convert_f16(isa, int(to_f16), _ptr(x), _ptr(out), x.size), "convert_f16")
    return out


def arch_check(arch_json: str | bytes) -> None:
    """Validate an architecture description (the JSON text of a container's "arch") with the core's reader, the one
    every path uses; raises NativeError(status ERR_INVALID) with its message ("arch: ...") if it is refused."""
    text = arch_json.encode() if isinstance(arch_json, str) else bytes(arch_json)
    err = ctypes.create_string_buffer(1024)
    st = _arch_check(text, len(text), err, len(err))
    if st == ERR_NOMEM:
        raise MemoryError(err.value.decode(errors="replace"))
    if st != OK:
        raise NativeError(err.value.decode(errors="replace"), st)


def _exported_table(symbol: str, what: str):
    """A table the core exports as JSON text with snprintf's contract (emoe_arch_schema_json, ...), parsed."""
    try:
        fn = _sig(symbol, _sz, _cp, _sz)
    except AttributeError:  # a core built from older sources than this package
        raise NativeLibraryNotFound(
            f"edgemoe's C core {LIB_PATH} has no {symbol}: it is older than this edgemoe. Rebuild it "
            "(pip install -e ., or cmake --build your build directory) and point EDGEMOE_NATIVE_LIB at the new "
            "library") from None
    n = fn(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    fn(buf, n + 1)
    try:
        return json.loads(buf.value)
    except ValueError as e:
        raise EdgeMoEError(f"edgemoe's C core {LIB_PATH} returned an unreadable {what} ({e}): rebuild it") from None


def arch_schema() -> list[dict]:
    """The arch object's schema (emoe_arch_schema_json): one dict per key, in the core's table order (name, kind,
    type, required, default, lo/hi, names, doc). edgemoe.arch builds ArchSpec from it."""
    return _exported_table("emoe_arch_schema_json", "arch schema")


def tensor_table() -> dict:
    """The tensor table (emoe_tensor_table_json): {"dims", "layer_kinds", "needs": [{name, doc}], "tensors": one dict
    per tensor in the core's table order (role, pattern, scope, rows, cols, layers, option, negated, need, doc)}.
    edgemoe.arch builds TENSOR_TABLE from it."""
    return _exported_table("emoe_tensor_table_json", "tensor table")


class ModelHandle:
    """Owns one emoe_model. Every failed call raises NativeError with the model's message."""

    def __init__(self, arch_json: str | bytes, max_ctx: int, kv_f16: bool, threads: int):
        """A model for an architecture description: the JSON text of a container's "arch" (ArchSpec.dumps()),
        parsed and validated by the core (emoe_model_new_json)."""
        text = arch_json.encode() if isinstance(arch_json, str) else bytes(arch_json)
        err, status = ctypes.create_string_buffer(1024), _int(0)
        self._m = _model_new_json(text, len(text), int(max_ctx), int(bool(kv_f16)), int(threads),
                                  ctypes.byref(status), err, len(err))
        if not self._m:
            msg = err.value.decode(errors="replace")
            if status.value == ERR_NOMEM:
                raise MemoryError(msg)
            raise NativeError(msg, status.value)

    def last_error(self) -> str:
        return _model_last_error(self._m).decode(errors="replace")

    def _check(self, status: int) -> None:
        if status != OK:  # streaming errors (I/O, checksum, budget) get their own NativeError subclasses
            raise _error_for(f"{self.last_error()} ({status_string(status)})", status)

    def set_tensor(self, name: str, dtype: int, data: np.ndarray, rows: int, cols: int) -> None:
        """Borrow `data` (the caller keeps it alive) as tensor `name`."""
        self._check(_model_set_tensor(self._m, name.encode(), dtype, _ptr(data), rows, cols))

    def set_expert_mwq(self, name: str, base: np.ndarray, offsets, n_planes: int, base_bits: int, group: int,
                       rows: int, cols: int) -> None:
        """Borrow MWQ planes (plane p at base + offsets[p-1]; the caller keeps base alive) as expert matrix `name`."""
        offs = np.ascontiguousarray(offsets, dtype=np.int64)
        self._check(_model_set_expert_mwq(self._m, name.encode(), _ptr(base), _ptr(offs), n_planes, base_bits, group,
                                          rows, cols))

    def set_precision(self, k: int) -> None:
        self._check(_model_set_precision(self._m, int(k)))

    @property
    def precision(self) -> int:
        return int(_model_precision(self._m))

    def expected_shape(self, name: str) -> tuple[int, int]:
        r, c = _i64(), _i64()
        self._check(_model_expected_shape(self._m, name.encode(), ctypes.byref(r), ctypes.byref(c)))
        return r.value, c.value

    def ready(self) -> None:
        self._check(_model_ready(self._m))

    def set_isa(self, isa: int) -> None:
        self._check(_model_set_isa(self._m, isa))

    @property
    def isa(self) -> int:
        return int(_model_isa(self._m))

    def set_q8_f32_act(self, on: bool) -> None:
        self._check(_model_set_q8_f32_act(self._m, int(bool(on))))

    def forward(self, tokens: np.ndarray, logits: np.ndarray | None, all_logits: bool) -> None:
        """tokens: int32 C-contiguous; logits: None or float32 C-contiguous of the right size (written in place)."""
        self._check(_forward(self._m, _ptr(tokens), tokens.size, None if logits is None else _ptr(logits),
                             int(all_logits)))

    @property
    def n_past(self) -> int:
        return int(_model_n_past(self._m))

    def reset(self) -> None:
        _model_reset(self._m)

    def truncate(self, n_keep: int) -> None:
        """Keep the first n_keep positions of the KV cache (0 <= n_keep <= n_past)."""
        self._check(_model_truncate(self._m, int(n_keep)))

    # ---- several sequences (emoe_model_set_n_seq, emoe_forward_batch) ----
    def set_n_seq(self, n_seq: int) -> None:
        """Hold n_seq sequences (reallocates the KV cache; every sequence is emptied)."""
        self._check(_model_set_n_seq(self._m, int(n_seq)))

    @property
    def n_seq(self) -> int:
        return int(_model_n_seq(self._m))

    def forward_seq(self, seq: int, tokens: np.ndarray, logits: np.ndarray | None, all_logits: bool) -> None:
        """forward() for sequence seq."""
        self._check(_forward_seq(self._m, int(seq), _ptr(tokens), tokens.size,
                                 None if logits is None else _ptr(logits), int(all_logits)))

    def forward_batch(self, tokens: np.ndarray, seqs: np.ndarray, logits: np.ndarray | None) -> None:
        """One token of each of the distinct sequences seqs (int32 C-contiguous, same size as tokens); logits:
        None or float32 [n, vocab] C-contiguous."""
        if seqs.size != tokens.size:
            raise NativeError(f"forward_batch: {tokens.size} tokens for {seqs.size} sequences", ERR_ARG)
        self._check(_forward_batch(self._m, _ptr(tokens), _ptr(seqs), tokens.size,
                                   None if logits is None else _ptr(logits)))

    def seq_n_past(self, seq: int) -> int:
        n = int(_model_seq_n_past(self._m, int(seq)))
        if n < 0:
            self._check(n)
        return n

    def truncate_seq(self, seq: int, n_keep: int) -> None:
        self._check(_model_truncate_seq(self._m, int(seq), int(n_keep)))

    def reset_seq(self, seq: int) -> None:
        _model_reset_seq(self._m, int(seq))

    def stats(self) -> dict:
        """emoe_model_stats as a dict (per-level arrays cut to the stored planes); mode -1 = not streaming."""
        s = Stats()
        self._check(_model_stats(self._m, ctypes.byref(s)))
        return _stats_dict(s)

    def reset_stats(self) -> None:
        _model_reset_stats(self._m)

    def drop_cache(self) -> None:
        """Empty the expert cache (every piece not in use)."""
        self._check(_model_drop_cache(self._m))

    def close(self) -> None:
        if getattr(self, "_m", None):
            _model_free(self._m)
            self._m = None
        if getattr(self, "_c", None):  # a resident model borrows the container's mapping: closed after the model
            _container_close(self._c)
            self._c = None

    def tensors(self) -> list[tuple[str, tuple[int, ...], bool]]:
        """The tensors this model reads, from the C tensor table (emoe_model_tensor): (name, shape, required), 1-D
        tensors with shape (n,)."""
        n = _model_tensor(self._m, -1, None, 0, None, None, None, None)
        if n < 0:
            self._check(n)
        out, name, nd, r, c, req = [], ctypes.create_string_buffer(128), _int(), _i64(), _i64(), _int()
        for i in range(n):
            _model_tensor(self._m, i, name, len(name), ctypes.byref(nd), ctypes.byref(r), ctypes.byref(c),
                          ctypes.byref(req))
            out.append((name.value.decode(), (c.value,) if nd.value == 1 else (r.value, c.value), bool(req.value)))
        return out

    def __del__(self):
        self.close()


# ---- a hard memory budget: the streaming engine (edgemoe.h "a hard memory budget") -----------------------------
ERR_IO, ERR_CORRUPT, ERR_BUDGET, ERR_FORMAT, ERR_INVALID = -7, -8, -9, -10, -11
MODES = {"exact": 0, "adaptive": 1, "ondemand": 2}
VERIFY_READS = {"never": 0, "first": 1, "always": 2}
STATS_LEVELS = 8
READ_NOTE_LEN = 384  # EMOE_READ_NOTE_LEN
_u64, _f64 = ctypes.c_uint64, ctypes.c_double


EVICT_POLICIES = {"auto": 0, "lru": 1, "cyclic": 2, "freq": 3}


class StreamOptions(ctypes.Structure):
    """emoe_stream_options (field order must match edgemoe.h)."""

    _fields_ = [("budget_bytes", _i64)] + [(n, _i32) for n in ("mode", "prefetch", "prefetch_extra", "precision",
                                                                 "io_threads", "direct", "drop_cache", "verify",
                                                                 "n_seq", "evict")] + [
        ("prefetch_min_confidence", _f32)]


class StreamPlan(ctypes.Structure):
    """emoe_stream_plan (field order must match edgemoe.h)."""

    _fields_ = [(n, _i64) for n in ("minimum_bytes", "dense_bytes", "kv_bytes", "scratch_bytes", "min_cache_bytes",
                                    "full_cache_bytes", "expert_bytes")]


class Stats(ctypes.Structure):
    """emoe_stats (field order must match edgemoe.h)."""

    _fields_ = ([(n, _i64) for n in ("budget_bytes", "minimum_bytes", "dense_bytes", "kv_bytes", "scratch_bytes",
                                     "cache_capacity_bytes", "cache_used_bytes", "cache_peak_bytes", "expert_bytes")]
                + [(n, _i32) for n in ("mode", "direct", "n_planes", "run_planes")]
                + [(n, _u64 * STATS_LEVELS) for n in ("hits", "misses", "late")]
                + [(n, _u64) for n in ("bytes_read", "demand_bytes", "read_syscalls", "pieces_read", "evictions",
                                       "evicted_bytes", "cancelled", "prefetch_issued", "prefetch_used",
                                       "prefetch_wasted", "pred_experts", "pred_hits", "pred_hits_k", "true_experts",
                                       "ahead_experts", "ahead_hits", "experts_run")]
                + [("experts_at_planes", _u64 * STATS_LEVELS)]
                + [(n, _u64) for n in ("tokens", "forward_calls", "crc_checked", "crc_failures", "read_errors")]
                + [(n, _f64) for n in ("stall_s", "io_busy_s", "forward_s")]
                + [("drop_cache", _i32), ("read_note", ctypes.c_char * READ_NOTE_LEN)])


class BudgetError(NativeError):
    """The memory budget is below what the model and context need; the message states the minimum, and `plan` holds
    it and its parts as numbers (the emoe_stream_plan fields: minimum_bytes, dense_bytes, kv_bytes, ...)."""

    plan: dict | None = None


class CorruptWeightsError(NativeError, FormatError):
    """Expert weights failed their CRC-32 while being read (the file is damaged)."""


class ReadError(NativeError):
    """Reading expert weights failed (I/O error, or the file was truncated or replaced while open)."""


def _error_for(message: str, status: int) -> NativeError:
    cls = {ERR_BUDGET: BudgetError, ERR_CORRUPT: CorruptWeightsError, ERR_IO: ReadError}.get(status, NativeError)
    return cls(message, status)


_container_open_status = _sig("emoe_container_open_status", _vp, _cp, _int, ctypes.POINTER(_int), ctypes.c_char_p,
                              _sz)
_container_close = _sig("emoe_container_close", None, _vp)
# emoe_container_open_status's kinds of failure -> the exception users see (edgemoe/errors.py)
_OPEN_ERRORS = {ERR_IO: FileReadError, ERR_FORMAT: NotAContainerError, ERR_CORRUPT: CorruptFileError,
                ERR_INVALID: InvalidFileError}


def container_open(path, verify: bool = False) -> int:
    """emoe_container_open_status: the C reader checks the preamble, the index (strict JSON), every tensor entry and
    the arch object (and with verify every checksum). Returns the handle (close it with container_close); a refusal
    raises the errors.py class of its kind, chosen by the status value."""
    err = ctypes.create_string_buffer(2048)
    status = _int(0)
    c = _container_open_status(os.fsencode(str(path)), int(bool(verify)), ctypes.byref(status), err, len(err))
    if not c:
        msg = err.value.decode(errors="replace")
        if status.value == ERR_NOMEM:
            raise MemoryError(msg)
        raise _OPEN_ERRORS.get(status.value, EdgeMoEError)(msg)
    return c


def container_close(handle: int | None) -> None:
    if handle:
        _container_close(handle)


_stream_options_init = _sig("emoe_stream_options_init", None, ctypes.POINTER(StreamOptions))
_load_streaming = _sig("emoe_container_load_streaming", _vp, _vp, _int, _int, _int, ctypes.POINTER(StreamOptions),
                       ctypes.c_char_p, _sz)
_stream_load = _sig("emoe_container_stream_load", _int, _vp, _int, _int, _int, ctypes.POINTER(StreamOptions),
                    ctypes.POINTER(_vp), ctypes.POINTER(StreamPlan), ctypes.c_char_p, _sz)
_load_model = _sig("emoe_container_load_model", _vp, _vp, _int, _int, _int, ctypes.c_char_p, _sz)
_model_tensor = _sig("emoe_model_tensor", _int, _vp, _int, ctypes.c_char_p, _sz, ctypes.POINTER(_int),
                     ctypes.POINTER(_i64), ctypes.POINTER(_i64), ctypes.POINTER(_int))
_model_stats = _sig("emoe_model_stats", _int, _vp, ctypes.POINTER(Stats))
_model_reset_stats = _sig("emoe_model_reset_stats", None, _vp)
_model_drop_cache = _sig("emoe_model_drop_cache", _int, _vp)


def stream_options(budget_bytes: int | None = None, mode: str = "exact", prefetch: int = 1, prefetch_extra: int = 1,
                   precision: int | None = None, io_threads: int = 2, direct: bool = True, drop_cache: bool = True,
                   verify: str = "first", n_seq: int = 1, evict: str = "auto",
                   prefetch_min_confidence: float | None = None) -> StreamOptions:
    if mode not in MODES:
        raise NativeError(f"mode {mode!r}: expected one of {sorted(MODES)}", ERR_ARG)
    if verify not in VERIFY_READS:
        raise NativeError(f"verify {verify!r}: expected one of {sorted(VERIFY_READS)}", ERR_ARG)
    if evict not in EVICT_POLICIES:
        raise NativeError(f"evict {evict!r}: expected one of {sorted(EVICT_POLICIES)}", ERR_ARG)
    o = StreamOptions()
    _stream_options_init(ctypes.byref(o))
    o.budget_bytes = int(budget_bytes or 0)
    o.mode, o.prefetch, o.prefetch_extra = MODES[mode], int(prefetch), int(prefetch_extra)
    o.precision, o.io_threads = int(precision or 0), int(io_threads)
    o.direct, o.drop_cache, o.verify = int(bool(direct)), int(bool(drop_cache)), VERIFY_READS[verify]
    o.n_seq, o.evict = int(n_seq), EVICT_POLICIES[evict]
    if prefetch_min_confidence is not None:
        o.prefetch_min_confidence = float(prefetch_min_confidence)
    return o


def _open_container(path, verify: bool):
    return container_open(path, verify)  # typed refusals (errors.py classes by status)


def open_streaming(path, max_ctx: int, kv_f16: bool, threads: int, options: StreamOptions,
                   plan_only: bool = False) -> tuple[ModelHandle | None, dict]:
    """Open a container in C and load it under a memory budget (dense weights read into anonymous memory, experts
    streamed through the expert cache): (the model, its plan: emoe_stream_plan's fields). The C container is closed
    again: the model keeps nothing of it. A budget below the minimum raises BudgetError carrying the plan (the
    minimum and its parts) as numbers; plan_only: no model, only the plan (still BudgetError below the minimum)."""
    c = _open_container(path, False)
    m, plan, err = _vp(), StreamPlan(), ctypes.create_string_buffer(2048)
    try:
        st = _stream_load(c, int(max_ctx), int(bool(kv_f16)), int(threads), ctypes.byref(options),
                          None if plan_only else ctypes.byref(m), ctypes.byref(plan), err, len(err))
    finally:
        _container_close(c)
    fields = {n: getattr(plan, n) for n, _ in StreamPlan._fields_}
    if st != OK:
        e = _error_for(err.value.decode(errors="replace"), st)
        if st == ERR_BUDGET:
            e.plan = fields
        raise e
    if plan_only:
        return None, fields
    h = ModelHandle.__new__(ModelHandle)
    h._m, h._c = m.value, None
    return h, fields


def open_resident(path, max_ctx: int, kv_f16: bool, threads: int, verify: bool = True) -> ModelHandle:
    """Open a container in C and register every tensor the model reads, borrowed from the file's mapping (any
    storage: f32/f16/q8_0/MWQ). verify: check every tensor's checksum first. The handle keeps the container open
    until it is closed."""
    c = _open_container(path, verify)
    err = ctypes.create_string_buffer(2048)
    m = _load_model(c, int(max_ctx), int(bool(kv_f16)), int(threads), err, len(err))
    if not m:
        _container_close(c)
        raise NativeError(err.value.decode(errors="replace"), ERR_ARG)
    h = ModelHandle.__new__(ModelHandle)
    h._m, h._c = m, c
    return h


def _stats_dict(s: Stats) -> dict:
    out = {}
    for name, ctype in Stats._fields_:
        v = getattr(s, name)
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        out[name] = list(v)[: max(1, s.n_planes if name != "experts_at_planes" else s.run_planes)] \
            if isinstance(v, ctypes.Array) else v
    return out
