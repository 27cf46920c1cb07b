"""The NumPy engine: runs the reference forward over container tensors. Exact but slow; the test oracle.

MWQ expert matrices (dtype "mwq") are dequantized from their first `precision` planes (`edgemoe.mwq.dequantize`),
read through `planes(name, k)`, which checks each plane's checksum on first use.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .arch import ArchSpec
from .mwq import dequantize
from .quant import to_f32
from .reference import reference_logits

PlaneReader = Callable[[str, int], list]  # (tensor name, k) -> the first k planes' bytes


class NumpyEngine:
    def __init__(self, spec: ArchSpec, tensors: dict[str, np.ndarray], dtypes: dict[str, str],
                 shapes: dict[str, tuple[int, ...]], precision: int | None = None,
                 planes: PlaneReader | None = None, quant: dict[str, dict] | None = None):
        """precision: planes per MWQ matrix (None = all stored); planes/quant: the container's plane reader and
        per-tensor MWQ parameters (needed when any dtype is "mwq")."""
        self.spec = spec
        self._tensors, self._dtypes, self._shapes = tensors, dtypes, shapes
        self._planes, self._quant = planes, quant or {}
        self.precision = precision
        self._cache: dict[str, np.ndarray] = {}
        self._ids: list[int] = []

    def weight(self, name: str) -> np.ndarray:
        w = self._cache.get(name)
        if w is None:
            if self._dtypes[name] == "mwq":
                w = self._mwq_weight(name)
            else:
                w = to_f32(self._tensors[name], self._dtypes[name], self._shapes[name])
            self._cache[name] = w
        return w

    def _mwq_weight(self, name: str) -> np.ndarray:
        if self._planes is None:
            raise ValueError(f"tensor {name} is MWQ but the engine was given no plane reader")
        q = self._quant[name]
        k = self.precision or q["n_planes"]
        out, in_ = self._shapes[name]
        return dequantize(self._planes(name, k), k, out, in_, q["base_bits"], q["group_size"])

    def logits(self, ids, on_route=None) -> np.ndarray:
        return reference_logits(self.spec, self.weight, ids, on_route)

    # Incremental interface (recomputes the whole sequence: the reference has no KV cache).
    def reset(self) -> None:
        self._ids = []

    def prefill(self, ids) -> np.ndarray:
        self._ids = [int(i) for i in ids]
        return self.logits(self._ids)[-1]

    def decode(self, token: int) -> np.ndarray:
        self._ids.append(int(token))
        return self.logits(self._ids)[-1]

    def close(self) -> None:
        self._cache.clear()
