"""MXFP4 (OCP microscaling FP4), the published gpt-oss expert format: read and dequantize to f32.

A `*_blocks` tensor [..., G, 16] uint8 holds 32 FP4 (e2m1) values per group, two per byte, the low nibble first; the
`*_scales` tensor [..., G] uint8 holds each group's power-of-two scale as a biased exponent (e8m0, bias 127). The
value of nibble n in a group with scale byte s is FP4[n] * 2^(s - 127). edgemoe converts on export (to f32/f16 or
MWQ); it has no MXFP4 kernels.
"""

from __future__ import annotations

import numpy as np

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> f32 [..., G * 32] (values in storage order)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match "
                         "(expected [..., G, 16] and [..., G])")
    b = blocks.astype(np.uint8, copy=False)
    out = np.empty((*b.shape[:-1], 32), np.float32)
    out[..., 0::2] = FP4_VALUES[b & 0x0F]
    out[..., 1::2] = FP4_VALUES[b >> 4]
    out = np.ldexp(out, scales.astype(np.int32)[..., None] - 127)
    return out.reshape(*b.shape[:-2], b.shape[-2] * 32)
