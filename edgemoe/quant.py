"""NumPy codecs for stored weight formats (the reference; the C core has its own fast kernels)."""

from __future__ import annotations

import numpy as np

Q8_0_BLOCK = 32
Q8_0_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_0_BLOCK,))])  # 34 bytes, ggml's block_q8_0


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q8_0 along the last axis: d = max|w|/127 per block of 32. Returns the raw uint8 blocks."""
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs the input dimension to be a multiple of {Q8_0_BLOCK}, got {w.shape[-1]}")
    blocks = w.reshape(-1, Q8_0_BLOCK)
    amax = np.abs(blocks).max(axis=1)
    d = (amax / np.float32(127.0)).astype(np.float32)  # like ggml: the unrounded f32 scale quantizes,
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)  # its f16 rounding is stored
    v = blocks * inv[:, None]
    out = np.empty(blocks.shape[0], dtype=Q8_0_DTYPE)
    out["d"] = d.astype(np.float16)
    out["qs"] = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127).astype(np.int8)  # roundf: half away
    return out.view(np.uint8)


def dequantize_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    blocks = np.asarray(raw).view(Q8_0_DTYPE)
    return (blocks["d"].astype(np.float32)[:, None] * blocks["qs"].astype(np.float32)).reshape(shape)


def to_f32(arr: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "f32":
        return np.asarray(arr, dtype=np.float32).reshape(shape)
    if dtype == "f16":
        return np.asarray(arr).astype(np.float32).reshape(shape)
    if dtype == "q8_0":
        return dequantize_q8_0(arr, shape)
    raise ValueError(f"cannot dequantize dtype {dtype}")
