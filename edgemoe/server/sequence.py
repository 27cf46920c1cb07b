"""One request's sequence: picks each next token from its logits and turns the tokens into text.

Like model._Continuation (same sampling, same TextStream, so a greedy request gives exactly Model.generate's text),
plus what a server needs: the finish reason ("stop" / "length"), OpenAI's frequency/presence penalties and logit_bias,
and an optional JSON constraint that restricts the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..sampling import SamplingParams, apply_repetition_penalty, sample
from ..textstream import TextStream


@dataclass
class Decoding:
    """How a request decodes (checked by openai_api before it gets here)."""

    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    stop_at_eos: bool = True
    frequency_penalty: float = 0.0  # OpenAI's: logit -= count * frequency_penalty, over the tokens generated so far
    presence_penalty: float = 0.0  # logit -= presence_penalty for every token generated at least once
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None = off; n = each token's log-probability and the n likeliest alternatives


class Sequence:
    """Feed logits with step(); each returns (new final text, finish reason or None). When not finished, `token` is
    the token to run through the model next."""

    def __init__(self, ids: list[int], d: Decoding, decode, eos: int | None, max_ctx: int, constraint=None):
        self.d, self.eos, self.max_ctx, self.constraint = d, eos, max_ctx, constraint
        self.text = TextStream(decode, d.stops)
        self.history = list(ids)  # prompt + output: what the repetition penalty looks at
        self.n_prompt = len(ids)
        self.rng = np.random.default_rng(d.seed)
        self.counts: dict[int, int] = {}  # generated token -> times (frequency/presence penalties)
        self.n_new = 0
        self.token: int | None = None
        self.decode = decode
        self.logprobs: list[dict] = []  # per generated token: {"token", "logprob", "top": [(text, logprob), ...]}

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        d = self.d
        if not (self.counts and (d.frequency_penalty or d.presence_penalty)) and not d.logit_bias:
            return logits
        out = logits.astype(np.float32, copy=True)
        if self.counts and (d.frequency_penalty or d.presence_penalty):
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            n = np.fromiter(self.counts.values(), dtype=np.float32)
            out[ids] -= n * d.frequency_penalty + d.presence_penalty
        for tok, bias in d.logit_bias.items():
            out[tok] += bias
        return out

    def _choose(self, logits: np.ndarray) -> int:
        logits = self._adjusted(logits)
        p = self.d.params
        if self.constraint is None:
            return sample(logits, p, self.rng, self.history)
        logits = apply_repetition_penalty(logits, self.history, p.repetition_penalty, p.repeat_last_n)
        eos = self.eos if self.d.stop_at_eos else None
        return self.constraint.choose(logits, replace(p, repetition_penalty=1.0), self.rng, eos)

    def step(self, logits: np.ndarray) -> tuple[str, str | None]:
        tok = self._choose(logits)
        if self.d.stop_at_eos and tok == self.eos:
            return self.text.flush(), "stop"
        if self.d.logprobs is not None:
            self.logprobs.append(self._logprob_entry(logits, tok))
        self.history.append(tok)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        self.n_new += 1
        self.token = tok
        piece = self.text.push(tok)
        if self.text.stopped:
            return piece, "stop"
        if self.constraint is not None:
            self.constraint.advance(tok)
            if self.constraint.finished:  # the JSON value is complete and nothing could extend it
                return piece + self.text.flush(), "stop"
        if self.n_new >= self.d.max_new_tokens or len(self.history) >= self.max_ctx:
            return piece + self.text.flush(), "length"
        return piece, None

    def _logprob_entry(self, logits: np.ndarray, tok: int) -> dict:
        """The model's log-probabilities (log-softmax of the raw logits, before penalties and sampling filters)."""
        z = logits.astype(np.float64)
        lse = z.max() + np.log(np.exp(z - z.max()).sum())
        n = self.d.logprobs
        top = np.argsort(-z, kind="stable")[:n].tolist() if n else []
        return {"token": self.decode([tok]), "logprob": float(z[tok] - lse),
                "top": [(self.decode([t]), float(z[t] - lse)) for t in top]}
