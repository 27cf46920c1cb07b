"""Next-token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty (llama.cpp's semantics)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EdgeMoEError


@dataclass
class SamplingParams:
    """How sample() picks a token; the defaults are greedy decoding. Checked on construction (EdgeMoEError)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1 = off; divides positive logits (multiplies negative) of seen tokens
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EdgeMoEError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise EdgeMoEError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EdgeMoEError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise EdgeMoEError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise EdgeMoEError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: np.ndarray, history: list[int], penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's rule: each distinct token among the last `last_n` of `history` (0 = all) has its logit divided by
    `penalty` if positive, multiplied by it if negative. Returns a copy (or `logits` itself when off)."""
    if penalty == 1.0 or not history:
        return logits
    out = logits.astype(np.float32, copy=True)
    seen = np.unique(np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64))
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: list[int]) -> int:
    """One token id from a [vocab] logit vector: the repetition penalty over `history`, then greedy (temperature 0)
    or a draw with `rng` from softmax(logits / temperature) restricted to the top_k most likely tokens, to those
    with p >= min_p * p_max, and to the smallest most-likely set whose probability reaches top_p (at least one
    token always stays)."""
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty, params.repeat_last_n)
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k > 0:
        order = order[: params.top_k]
    zs = z[order]
    p = np.exp(zs - zs[0])
    p /= p.sum()
    keep = len(p)
    if params.min_p > 0:
        keep = min(keep, int(np.sum(p >= params.min_p * p[0])))
    if params.top_p < 1:
        keep = min(keep, int(np.searchsorted(np.cumsum(p), params.top_p) + 1))
    keep = max(keep, 1)
    p = p[:keep] / p[:keep].sum()
    return int(order[rng.choice(keep, p=p)])
