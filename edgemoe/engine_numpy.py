"""The NumPy engine: runs the reference forward over container tensors. Exact but slow; the test oracle."""

from __future__ import annotations

import numpy as np

from .arch import ArchSpec
from .quant import to_f32
from .reference import reference_logits


class NumpyEngine:
    def __init__(self, spec: ArchSpec, tensors: dict[str, np.ndarray], dtypes: dict[str, str],
                 shapes: dict[str, tuple[int, ...]]):
        self.spec = spec
        self._tensors, self._dtypes, self._shapes = tensors, dtypes, shapes
        self._cache: dict[str, np.ndarray] = {}
        self._ids: list[int] = []

    def weight(self, name: str) -> np.ndarray:
        w = self._cache.get(name)
        if w is None:
            w = to_f32(self._tensors[name], self._dtypes[name], self._shapes[name])
            self._cache[name] = w
        return w

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
