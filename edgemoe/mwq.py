"""MWQ bit planes (container v2): the byte layout and the NumPy reference dequantizer. Spec: docs/FORMAT.md.

An expert matrix W [out, in] is cut into groups of `group_size` consecutive weights along the input dimension
(ng = in / group_size groups per row) and stored as planes P1 | P2 | ... | PK:

- P1, the base plane (b1 = base_bits in {2, 4, 8}): `s1[out*ng] f16 | m1[out*ng] f16 | codes`, codes q in
  [0, 2^b1 - 1] packed little-endian within bytes (code j of a byte in bits j*b1 .. j*b1 + b1 - 1), row-major over
  (row, group, position). Contribution: s1 * q + m1.
- Pk, k >= 2, a residual plane: `s_k[out*ng] f16 | signs`, one bit per weight, 8 per byte, bit j of a byte = weight j
  (row-major), 1 -> +1, 0 -> -1. Contribution: s_k * B.

W_hat_k = s1 * q + m1 + sum_{i=2..k} s_i * B_i, computed in float32 from the float16 scales. This module is the
reference the C kernels are tested against; the exporter's fitting lives in `edgemoe_export.mwq`.
"""

from __future__ import annotations

import numpy as np

from .errors import FormatError

BASE_BITS = (2, 4, 8)
GROUP_MULTIPLE = 8  # group_size must be a multiple of 8 so every group's codes and signs start on a byte boundary


def check_params(out: int, in_: int, base_bits: int, group_size: int) -> int:
    """Validate the plane parameters of one matrix; returns the number of groups per row."""
    if base_bits not in BASE_BITS:
        raise ValueError(f"base_bits={base_bits}: expected one of {BASE_BITS}")
    if group_size <= 0 or group_size % GROUP_MULTIPLE:
        raise ValueError(f"group_size={group_size}: expected a positive multiple of {GROUP_MULTIPLE}")
    if in_ % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dimension {in_}")
    if out <= 0:
        raise ValueError(f"out={out}: expected a positive number of rows")
    return in_ // group_size


def plane_nbytes(plane: int, out: int, in_: int, base_bits: int, group_size: int) -> int:
    """Bytes of plane `plane` (1 = base) of an [out, in] matrix, scales included, no padding."""
    ng = check_params(out, in_, base_bits, group_size)
    if plane == 1:
        return 2 * 2 * out * ng + out * in_ * base_bits // 8
    return 2 * out * ng + out * in_ // 8


def plane_bits(plane: int, base_bits: int) -> int:
    return base_bits if plane == 1 else 1


def bits_per_weight(plane: int, base_bits: int, group_size: int) -> float:
    """Storage cost of one plane per weight, scales included (P1 at b1=2, g=128: 2.25; residual: 1.125)."""
    return base_bits + 32 / group_size if plane == 1 else 1 + 16 / group_size


# --- packing ------------------------------------------------------------------------------------------------
def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (any shape, row-major order) -> bytes, little-endian within each byte."""
    q = np.ascontiguousarray(q, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return q.copy()
    per = 8 // bits
    if q.size % per:
        raise ValueError(f"{q.size} codes do not fill whole bytes at {bits} bits")
    q = q.reshape(-1, per).astype(np.uint8)
    out = np.zeros(q.shape[0], dtype=np.uint8)
    for j in range(per):
        out |= (q[:, j] & ((1 << bits) - 1)) << np.uint8(j * bits)
    return out


def unpack_codes(raw: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Bytes -> n unsigned codes (uint8)."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return raw[:n].copy()
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    return ((raw[: n // per, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n].astype(np.uint8)


def pack_signs(b: np.ndarray) -> np.ndarray:
    """Signs (+1 / -1, or bool with True = +1), row-major -> bytes, bit j of a byte = element j."""
    bits = np.asarray(b).reshape(-1) > 0
    return np.packbits(bits, bitorder="little")


def unpack_signs(raw: np.ndarray, n: int) -> np.ndarray:
    """Bytes -> n signs as float32 +1 / -1."""
    bits = np.unpackbits(np.asarray(raw, dtype=np.uint8).reshape(-1), count=n, bitorder="little")
    return bits.astype(np.float32) * 2.0 - 1.0


def encode_base_plane(s1: np.ndarray, m1: np.ndarray, q: np.ndarray, base_bits: int) -> np.ndarray:
    """(s1 [out, ng], m1 [out, ng], codes [out, in]) -> the bytes of P1."""
    return np.concatenate([
        np.ascontiguousarray(s1, dtype=np.float16).reshape(-1).view(np.uint8),
        np.ascontiguousarray(m1, dtype=np.float16).reshape(-1).view(np.uint8),
        pack_codes(q, base_bits),
    ])


def encode_residual_plane(s: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """(s [out, ng], signs [out, in] of +1/-1) -> the bytes of one residual plane."""
    return np.concatenate([np.ascontiguousarray(s, dtype=np.float16).reshape(-1).view(np.uint8), pack_signs(signs)])


# --- parsing and dequantization -----------------------------------------------------------------------------
def _check_plane(plane: np.ndarray, index: int, out: int, in_: int, base_bits: int, group_size: int) -> np.ndarray:
    plane = np.asarray(plane, dtype=np.uint8).reshape(-1)
    want = plane_nbytes(index, out, in_, base_bits, group_size)
    if plane.nbytes != want:
        raise FormatError(f"MWQ plane {index} of a [{out}, {in_}] matrix has {plane.nbytes} bytes, expected {want}")
    return plane


def parse_base_plane(plane: np.ndarray, out: int, in_: int, base_bits: int, group_size: int):
    """P1 bytes -> (s1 f16 [out, ng], m1 f16 [out, ng], codes uint8 [out, in])."""
    ng = in_ // group_size
    plane = _check_plane(plane, 1, out, in_, base_bits, group_size)
    n = out * ng
    s1 = plane[: 2 * n].view(np.float16).reshape(out, ng)
    m1 = plane[2 * n : 4 * n].view(np.float16).reshape(out, ng)
    q = unpack_codes(plane[4 * n :], base_bits, out * in_).reshape(out, in_)
    return s1, m1, q


def parse_residual_plane(plane: np.ndarray, index: int, out: int, in_: int, base_bits: int, group_size: int):
    """Pk bytes -> (s f16 [out, ng], signs f32 [out, in] of +1/-1)."""
    ng = in_ // group_size
    plane = _check_plane(plane, index, out, in_, base_bits, group_size)
    s = plane[: 2 * out * ng].view(np.float16).reshape(out, ng)
    return s, unpack_signs(plane[2 * out * ng :], out * in_).reshape(out, in_)


def dequantize(planes: list[np.ndarray], k: int, out: int, in_: int, base_bits: int, group_size: int) -> np.ndarray:
    """W_hat_k as float32 [out, in] from the first k planes (float32 arithmetic, planes added in order)."""
    ng = check_params(out, in_, base_bits, group_size)
    if not 1 <= k <= len(planes):
        raise ValueError(f"precision k={k}: expected 1..{len(planes)} (the planes given)")
    s1, m1, q = parse_base_plane(planes[0], out, in_, base_bits, group_size)
    w = (s1.astype(np.float32)[:, :, None] * q.reshape(out, ng, group_size).astype(np.float32)
         + m1.astype(np.float32)[:, :, None])
    for i in range(1, k):
        s, b = parse_residual_plane(planes[i], i + 1, out, in_, base_bits, group_size)
        w += s.astype(np.float32)[:, :, None] * b.reshape(out, ng, group_size)
    return w.reshape(out, in_)
