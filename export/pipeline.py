"""`edgemoe export`: checkpoint -> container, streamed layer by layer.

The container's dense part (embeddings, norms, attention, routers, shared experts, lm_head) is written first,
then each expert matrix in its own 4 KiB-aligned region. Only one layer's tensors are in memory at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemoe.container import ContainerWriter
from edgemoe.errors import EdgeMoEError
from edgemoe.quant import quantize_q8_0

from .checkpoint import open_checkpoint
from .progress import progress

SUPPORTED_BITS = (32, 16)


def _encode(arr: np.ndarray, bits: int, dense_bits: int | None) -> tuple[np.ndarray, str]:
    """Storage for one tensor: 1-D tensors (norms, biases) stay f32; matrices follow --bits / --dense-bits."""
    if arr.ndim == 1 or bits == 32 and dense_bits in (None, 32):
        return arr.astype(np.float32), "f32"
    width = dense_bits or bits
    if width == 8:
        return quantize_q8_0(arr), "q8_0"
    if width == 16:
        return arr.astype(np.float16), "f16"
    return arr.astype(np.float32), "f32"


def export(src: str | Path, out: str | Path, bits: int = 32, dense_bits: int | None = None,
           show_progress: bool = True) -> Path:
    if bits not in SUPPORTED_BITS:
        raise EdgeMoEError(f"--bits {bits} is not available yet; supported: {', '.join(map(str, SUPPORTED_BITS))}")
    if dense_bits not in (None, 32, 16, 8):
        raise EdgeMoEError(f"--dense-bits {dense_bits}: expected 8, 16 or 32")
    out = Path(out)
    if out.is_dir():
        raise EdgeMoEError(f"{out}: is a directory; give the output file name, e.g. {out / 'model.emoe'}")
    if not out.parent.exists():
        raise EdgeMoEError(f"{out.parent}: output directory does not exist")
    ckpt = open_checkpoint(src)
    spec = ckpt.spec
    metadata = {
        "source": str(Path(src).resolve().name),
        "source_model_type": ckpt.config.get("model_type"),
        "bits": bits,
        "dense_bits": dense_bits or bits,
        "expert_dtype": "f32" if bits == 32 else "f16",
    }
    with ContainerWriter(out, spec, metadata) as w:
        if ckpt.tokenizer_json is not None:
            w.add_tensor("tokenizer.json", np.frombuffer(ckpt.tokenizer_json, np.uint8), "bytes", kind="blob")
        for name, arr in ckpt.global_tensors().items():
            w.add_tensor(name, *_encode(arr, bits, dense_bits))
        for layer in progress(range(spec.n_layers), "dense layers", show_progress):
            for name, arr in ckpt.layer_dense(layer).items():
                w.add_tensor(name, *_encode(arr, bits, dense_bits))
        for layer in progress(range(spec.n_layers), "expert layers", show_progress):
            if not spec.is_moe_layer(layer):
                continue
            for name, arr in ckpt.layer_experts(layer):
                stored = arr.astype(np.float32 if bits == 32 else np.float16)
                w.add_tensor(name, stored, "f32" if bits == 32 else "f16", kind="expert")
    return out
