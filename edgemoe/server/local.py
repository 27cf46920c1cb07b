"""OpenAI's shapes in Python, without a server (llama-cpp-python's names): create_chat_completion and
create_completion take the same parameters as the HTTP API and return the same dicts, or with stream=True an
iterator of the chunk dicts. They run in the caller's thread on sequence slot 0, as Model.generate does (and keep
its KV cache for prefix reuse the same way); no web stack is needed."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path

from ..errors import EdgeMoEError
from . import openai_api as api
from .prepare import Prepared, Preparer
from .scheduler import _common_prefix
from .sequence import Sequence

_preparers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Preparer (keeps its token index)


def _preparer(model) -> Preparer:
    if model not in _preparers:
        path = Path(model.container.path)
        _preparers[model] = Preparer(model, (path.stem, path.name))
    return _preparers[model]


def create_chat_completion(model, messages: list[dict], **params) -> dict | Iterator[dict]:
    """`messages` and OpenAI's chat parameters (temperature, max_tokens, stop, stream, response_format, tools, ...)
    -> a chat.completion dict (or chunk dicts). Raises APIError (an EdgeMoEError) for what the server answers 4xx."""
    p = _preparer(model)
    return _run(model, p.chat({"model": p.model_ids[0], **params, "messages": messages}))


def create_completion(model, prompt: str | list[int], **params) -> dict | Iterator[dict]:
    """`prompt` (text or token ids) and OpenAI's completion parameters -> a text_completion dict (or chunk dicts)."""
    p = _preparer(model)
    return _run(model, p.completion({"model": p.model_ids[0], **params, "prompt": prompt}))


def _run(model, prep: Prepared):
    state = {}
    events = _events(model, prep, state)
    prep.entries = lambda: state["seq"].logprobs if "seq" in state else []

    def usage() -> dict:
        return api.usage(len(prep.ids), state["seq"].n_new, state["cached"])

    if not prep.opts.stream:
        pieces, reason = [], None
        for kind, value in events:
            if kind == "text":
                pieces.append(value)
            else:
                reason = value
        return prep.response("".join(pieces), reason, usage())

    def chunks():
        yield from prep.first_chunks()
        for kind, value in events:
            yield from prep.event_chunks(kind, value, usage)

    return chunks()


def _events(model, prep: Prepared, state: dict):
    """("text", piece)... ("done", finish_reason): the request decoded on slot 0."""
    decode = model.tokenizer.decode if model.tokenizer is not None else (lambda ids: "".join(f" {i}" for i in ids))
    seq = Sequence(prep.ids, prep.opts.decoding, decode, model.spec.eos_token_id, model.max_ctx, prep.constraint)
    with model._lock:  # each token's computation under the model's lock, the yield outside it (as generate does)
        model._check_open()
        state["seq"], state["cached"] = seq, _common_prefix(model._engine.cached_ids, prep.ids[:-1])
        logits = model._prefill_reusing_cache(prep.ids)
        model._sequence += 1  # slot 0 now holds this request: a generate() stream started before notices
        mine = model._sequence
    while True:
        piece, reason = seq.step(logits)
        if piece:
            yield "text", piece
        if reason:
            yield "done", reason
            return
        with model._lock:
            model._check_open()
            if model._sequence != mine:
                raise EdgeMoEError("this completion stream was resumed after another call replaced its sequence in "
                                   "the KV cache; finish one stream before starting another (or serve several "
                                   "clients with `edgemoe serve --n-seq N`)")
            logits = model._decode(seq.token)  # the model's one decode step (its statistics included)
