"""Perplexity over a text in non-overlapping windows (each window a fresh sequence)."""

from __future__ import annotations

import numpy as np

from .errors import EdgeMoEError


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(model, text: str, ctx: int = 256, max_tokens: int | None = None, progress=None) -> dict:
    """Perplexity of `text` over windows of ctx tokens. progress(done, total): called after each window."""
    if model.tokenizer is None:
        raise EdgeMoEError("the container has no tokenizer; perplexity needs one")
    ids = model.tokenizer.encode(text)
    if max_tokens:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise EdgeMoEError("text is too short for perplexity (fewer than 2 tokens)")
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, ctx):
        window = ids[start : start + ctx + 1]
        if len(window) < 2:
            break
        lp = log_softmax(model.logits(window[:-1]))
        nll -= float(lp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
        if progress is not None:
            progress(count, len(ids) - 1)
    return {"ppl": float(np.exp(nll / count)), "nll": nll / count, "tokens": count, "ctx": ctx}
