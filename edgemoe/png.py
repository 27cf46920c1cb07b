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


# ---- a labelled heatmap: axes, tick labels, title and a colour bar, drawn with a 5x7 bitmap font -------------------
# Each glyph is 7 rows of 5 bits (most significant bit = leftmost pixel). Upper case is drawn as lower case.
_FONT = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E), "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F), "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02), "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E), "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E), "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "a": (0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F), "b": (0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E),
    "c": (0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E), "d": (0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F),
    "e": (0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E), "f": (0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08),
    "g": (0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E), "h": (0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11),
    "i": (0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E), "j": (0x02, 0, 0x06, 0x02, 0x02, 0x12, 0x0C),
    "k": (0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12), "l": (0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "m": (0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11), "n": (0, 0, 0x16, 0x19, 0x11, 0x11, 0x11),
    "o": (0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E), "p": (0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10),
    "q": (0, 0, 0x0D, 0x13, 0x0F, 0x01, 0x01), "r": (0, 0, 0x16, 0x19, 0x10, 0x10, 0x10),
    "s": (0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E), "t": (0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06),
    "u": (0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D), "v": (0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "w": (0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A), "x": (0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11),
    "y": (0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E), "z": (0, 0, 0x1F, 0x02, 0x04, 0x08, 0x1F),
    " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 0x0C, 0x0C), ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0), "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08), "-": (0, 0, 0, 0x1F, 0, 0, 0),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0), "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "=": (0, 0, 0x1F, 0, 0x1F, 0, 0), "_": (0, 0, 0, 0, 0, 0, 0x1F), "'": (0x04, 0x04, 0x08, 0, 0, 0, 0),
    "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0), "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04),
}
SCALE = 2  # font pixels per glyph pixel
CHAR_W, CHAR_H = 6 * SCALE, 7 * SCALE  # advance (5 pixels + 1 space) and height
INK = np.array([40, 40, 40], np.uint8)
LO, HI = np.array([255, 255, 255], float), np.array([8, 48, 107], float)  # white (0) to dark blue (max)


def text_width(s: str) -> int:
    return len(s) * CHAR_W - SCALE


def draw_text(img: np.ndarray, x: int, y: int, s: str, color=INK) -> None:
    """Draw `s` with its top-left corner at (x, y); characters outside the font are drawn as '?'."""
    for i, ch in enumerate(s.lower()):
        rows = _FONT.get(ch, _FONT["?"])
        for r, bits in enumerate(rows):
            for c in range(5):
                if bits >> (4 - c) & 1:
                    y0, x0 = y + r * SCALE, x + i * CHAR_W + c * SCALE
                    img[y0:y0 + SCALE, x0:x0 + SCALE] = color


def colour(v: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> RGB uint8, the heatmap's scale."""
    return (LO + (HI - LO) * np.asarray(v, float)[..., None]).astype(np.uint8)


def labelled_heatmap(values: np.ndarray, title: str, xlabel: str = "expert", ylabel: str = "layer",
                     scale_label: str = "share of the layer's routings", layout: dict | None = None) -> np.ndarray:
    """[rows, cols] values >= 0 -> an RGB image: one cell per value (row r = ylabel r, column c = xlabel c), tick
    labels (every column while they fit, else every k-th), the axis names, a title and a colour bar from 0 to the
    largest value (in percent). layout: a dict to receive the grid's place (left, top, cell_w, cell_h, bar_x)."""
    v = np.asarray(values, dtype=np.float64)
    rows, cols = v.shape
    vmax = float(v.max()) if v.size and v.max() > 0 else 1.0
    cw = max(4, min(24, 900 // max(cols, 1)))
    ch = max(8, min(24, 600 // max(rows, 1)))
    step = 1
    while step * cw < text_width(str(cols - 1)) + 4:  # column labels every `step` columns so that they fit
        step += 1
    left = max(text_width(ylabel), text_width(str(rows - 1))) + 12
    top = 2 * CHAR_H + 12
    grid_w, grid_h = cols * cw, rows * ch
    bar_x = left + grid_w + 16
    scale_top = f"{vmax:.0%}"
    right = bar_x + 14 + 6 + max(text_width(scale_top), text_width("0%")) + 8
    bottom = top + grid_h + 6 + CHAR_H + 6 + CHAR_H + 8
    width = max(right, left + text_width(title) + 8, left + text_width(scale_label) + 8)
    img = np.full((bottom + CHAR_H + 8, width, 3), 255, np.uint8)
    if layout is not None:
        layout.update(left=left, top=top, cell_w=cw, cell_h=ch, bar_x=bar_x)
    draw_text(img, left, 6, title)
    draw_text(img, left - text_width(ylabel) - 8, top - CHAR_H - 6, ylabel)
    cells = colour(v / vmax)
    img[top:top + grid_h, left:left + grid_w] = np.repeat(np.repeat(cells, ch, axis=0), cw, axis=1)
    img[top - 1, left - 1:left + grid_w + 1] = img[top + grid_h, left - 1:left + grid_w + 1] = INK  # frame
    img[top - 1:top + grid_h + 1, left - 1] = img[top - 1:top + grid_h + 1, left + grid_w] = INK
    for r in range(rows):
        label = str(r)
        draw_text(img, left - text_width(label) - 6, top + r * ch + (ch - CHAR_H) // 2, label)
    for c in range(0, cols, step):
        label = str(c)
        draw_text(img, left + c * cw + (cw - text_width(label)) // 2, top + grid_h + 6, label)
    draw_text(img, left + (grid_w - text_width(xlabel)) // 2, top + grid_h + 6 + CHAR_H + 6, xlabel)
    # the colour bar: 0 at the bottom, the largest value at the top
    ramp = colour(np.linspace(1, 0, grid_h))[:, None, :]
    img[top:top + grid_h, bar_x:bar_x + 14] = np.repeat(ramp, 14, axis=1)
    draw_text(img, bar_x + 20, top, scale_top)
    draw_text(img, bar_x + 20, top + grid_h - CHAR_H, "0%")
    draw_text(img, left, bottom, scale_label)
    return img
