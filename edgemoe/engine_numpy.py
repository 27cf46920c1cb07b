"""The NumPy engine: runs the reference forward over container tensors. Exact but slow; the test oracle.

MWQ expert matrices (dtype "mwq") are dequantized from their first `precision` planes (`edgemoe.mwq.dequantize`),
read through `planes(name, k)`, which checks each plane's checksum on first use.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .arch import ArchSpec
from .errors import EdgeMoEError
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

    # Incremental interface. The reference keeps no keys/values (it is the plain oracle), so every call recomputes
    # the whole sequence; the token list plays the KV cache's part, with the same verbs and semantics as CEngine.
    def reset(self) -> None:
        """Forget the sequence."""
        self._ids = []

    def prefill(self, ids) -> np.ndarray:
        """Start a fresh sequence with `ids`; returns the last position's logits [vocab]."""
        self._ids = [int(i) for i in ids]
        return self.logits(self._ids)[-1]

    def extend(self, ids) -> np.ndarray:
        """Append `ids` to the current sequence; returns the last position's logits [vocab]."""
        self._ids.extend(int(i) for i in ids)
        return self.logits(self._ids)[-1]

    def decode(self, token: int) -> np.ndarray:
        """Append one token; returns its logits [vocab]."""
        return self.extend([token])

    def truncate(self, n_keep: int) -> None:
        """Keep the first n_keep tokens of the sequence (0 <= n_keep <= n_past)."""
        if not 0 <= n_keep <= len(self._ids):
            raise EdgeMoEError(f"truncate: n_keep {n_keep} is outside 0..{len(self._ids)} (the tokens in the sequence)")
        del self._ids[n_keep:]

    @property
    def n_past(self) -> int:
        return len(self._ids)

    @property
    def cached_ids(self) -> list[int]:
        """The token ids of the current sequence (a copy)."""
        return list(self._ids)

    def close(self) -> None:
        self._cache.clear()
