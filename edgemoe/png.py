"""A dependency-free PNG writer for heatmaps (the device side does not carry matplotlib)."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_png(path, rgb: np.ndarray) -> None:
    """rgb: uint8 [height, width, 3]."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].tobytes() for y in range(h))
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    data += _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)


def heatmap(values: np.ndarray, cell: int = 12) -> np.ndarray:
    """[rows, cols] values -> an RGB image, white (0) to dark blue (max), each value a cell x cell square."""
    v = np.asarray(values, dtype=np.float64)
    v = v / v.max() if v.max() > 0 else v
    lo, hi = np.array([255, 255, 255], float), np.array([8, 48, 107], float)
    img = (lo + (hi - lo) * v[..., None]).astype(np.uint8)
    return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)
