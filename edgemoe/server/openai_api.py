"""OpenAI's request bodies checked into what the scheduler runs, and its response objects shaped from the results.

Plain dicts in, plain dicts out (no web framework here): app.py does the HTTP, this file knows OpenAI's API.
Errors are APIError (status + OpenAI's error object), never an exception text from deeper down.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from ..errors import EdgeMoEError
from ..sampling import SamplingParams
from .json_constraint import Node, SchemaError, any_object, compile_schema
from .sequence import Decoding


class APIError(EdgeMoEError):
    """An error the client gets as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Accepted but without effect here: bookkeeping fields of OpenAI's API.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key"}
# Sampling fields shared by both endpoints; top_k, min_p, repetition_penalty, repeat_last_n are the usual extensions of
# local servers (vLLM, llama-server), sent by the openai client through extra_body.
SAMPLING = {"temperature", "top_p", "top_k", "min_p", "seed", "stop", "max_tokens", "frequency_penalty",
            "presence_penalty", "repetition_penalty", "repeat_last_n", "logit_bias", "n", "stream", "stream_options",
            "model", "logprobs"}
CHAT_FIELDS = SAMPLING | IGNORED | {"messages", "max_completion_tokens", "response_format", "tools", "tool_choice",
                                    "top_logprobs"}
COMPLETION_FIELDS = SAMPLING | IGNORED | {"prompt", "echo", "best_of", "suffix"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _num(body: dict, key: str, default, lo=None, hi=None, integer=False, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and int(v) != v):
        raise APIError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", key,
                       "invalid_value")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        rng = f"{lo_s} and <= {hi}" if hi is not None else lo_s
        raise APIError(400, f"'{key}' must be {rng}, got {v}", key, "invalid_value")
    return int(v) if integer else float(v)


def check_fields(body: dict, allowed: set[str], endpoint: str) -> None:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"{endpoint}: unsupported parameter '{unknown[0]}' (edgemoe serve accepts: "
                            f"{', '.join(sorted(allowed - IGNORED))})", unknown[0], "unsupported_parameter")


def check_model(body: dict, model_ids: tuple[str, ...]) -> None:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise APIError(400, f"'model' is required: this server serves {model_ids[0]!r}", "model", "missing_required")
    if name not in model_ids:
        raise APIError(404, f"the model {name!r} does not exist here; this server serves {model_ids[0]!r}", "model",
                       "model_not_found")


@dataclass
class Options:
    """What both endpoints share, checked."""

    decoding: Decoding
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None  # None = until the context is full
    extra: dict = field(default_factory=dict)


def sampling_options(body: dict, vocab: int, chat: bool = False) -> Options:
    """temperature, top_p, ..., stop, max_tokens -> Options (400 for a bad value or an unsupported one)."""
    max_key = "max_completion_tokens" if chat else "max_tokens"
    n = _num(body, "n", 1, integer=True)
    if n != 1:
        raise APIError(400, f"'n' must be 1 (one choice per request; send several requests, they run in parallel), "
                            f"got {n}", "n", "unsupported_value")
    if chat:  # logprobs: true, top_logprobs: 0..20
        want = body.get("logprobs")
        if want not in (None, True, False):
            raise APIError(400, f"'logprobs' must be true or false, got {json.dumps(want)}", "logprobs",
                           "invalid_value")
        top = _num(body, "top_logprobs", None, lo=0, hi=20, integer=True)
        if top is not None and not want:
            raise APIError(400, "'top_logprobs' needs \"logprobs\": true", "top_logprobs", "invalid_value")
        logprobs = (top or 0) if want else None
    else:  # logprobs: 0..5 alternatives
        logprobs = _num(body, "logprobs", None, lo=0, hi=5, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false, got {json.dumps(stream)}", "stream", "invalid_value")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage", "include_obfuscation"}:
            raise APIError(400, "'stream_options' must be {\"include_usage\": true|false}", "stream_options",
                           "invalid_value")
        if not stream:
            raise APIError(400, "'stream_options' is only allowed with \"stream\": true", "stream_options",
                           "invalid_value")
        include_usage = bool(so.get("include_usage", False))
    max_tokens = _num(body, max_key, None, lo=1, integer=True)
    if max_key != "max_tokens" and max_tokens is None:
        max_tokens = _num(body, "max_tokens", None, lo=1, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
                             or len(stop) > 16):
        raise APIError(400, "'stop' must be a string or a list of at most 16 strings", "stop", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, got {json.dumps(seed)}", "seed", "invalid_value")
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise APIError(400, "'logit_bias' must map token ids to numbers in [-100, 100]", "logit_bias", "invalid_value")
    logit_bias = {}
    for k, v in bias.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            tok = -1
        if not 0 <= tok < vocab or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise APIError(400, f"'logit_bias': token {k!r} -> {v!r}: expected token ids 0..{vocab - 1} mapped to "
                                f"numbers in [-100, 100]", "logit_bias", "invalid_value")
        logit_bias[tok] = float(v)
    try:
        params = SamplingParams(temperature=_num(body, "temperature", 1.0, lo=0, hi=2),
                                top_k=_num(body, "top_k", 0, lo=0, integer=True),
                                top_p=_num(body, "top_p", 1.0, lo=0, hi=1, lo_open=True),
                                min_p=_num(body, "min_p", 0.0, lo=0, hi=1),
                                repetition_penalty=_num(body, "repetition_penalty", 1.0, lo=0, lo_open=True),
                                repeat_last_n=_num(body, "repeat_last_n", 64, lo=0, integer=True))
    except EdgeMoEError as e:
        raise APIError(400, str(e), None, "invalid_value") from None
    decoding = Decoding(max_new_tokens=max_tokens or 0, params=params, seed=seed, stops=[s for s in stop or [] if s],
                        frequency_penalty=_num(body, "frequency_penalty", 0.0, lo=-2, hi=2),
                        presence_penalty=_num(body, "presence_penalty", 0.0, lo=-2, hi=2), logit_bias=logit_bias,
                        logprobs=logprobs)
    return Options(decoding, stream, include_usage, max_tokens)


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> what a chat template renders: content parts joined into one string, roles checked."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}", "messages",
                       "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"{where}: expected a dict with a role system, developer, user, assistant or tool",
                           where, "invalid_value")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise APIError(400, f"{where}: content part of type {kind!r} is not supported (text only)",
                                   where, "unsupported_value")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise APIError(400, f"{where}: 'content' is missing", where, "invalid_value")
        if content is not None and not isinstance(content, str):
            raise APIError(400, f"{where}: 'content' must be a string or a list of text parts", where,
                           "invalid_value")
        msg = dict(m) | {"content": content}
        if msg["role"] == "developer":  # OpenAI's newer name for the system message; templates know "system"
            msg["role"] = "system"
        out.append(msg)
    return out


def completion_prompt(body: dict, vocab: int) -> str | list[int]:
    for key, ok in (("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None, ""))):
        if body.get(key) not in ok:
            raise APIError(400, f"'{key}' is not supported by edgemoe serve", key, "unsupported_parameter")
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"'prompt': token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt",
                           "invalid_value")
        return p
    raise APIError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                   "prompt", "invalid_value")


def response_format_node(rf) -> Node | None:
    """response_format -> the JSON node the reply must match (None = free text)."""
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return any_object()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise APIError(400, "'response_format': json_schema must be {\"name\": ..., \"schema\": {...}}",
                           "response_format", "invalid_value")
        try:
            return compile_schema(js.get("schema", {}))
        except SchemaError as e:
            raise APIError(400, f"'response_format': {e}", "response_format", "invalid_value") from None
    raise APIError(400, "'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}",
                   "response_format", "invalid_value")


# --- responses ---------------------------------------------------------------------------------------------------
def usage(n_prompt: int, n_completion: int, n_cached: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion,
            "prompt_tokens_details": {"cached_tokens": n_cached}}


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """Sequence.logprobs entries -> a chat choice's "logprobs" (None when not asked for)."""
    if entries is None:
        return None

    def one(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [one(e["token"], e["logprob"]) | {"top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict] | None, offset: int = 0) -> dict | None:
    """Sequence.logprobs entries -> a completion choice's "logprobs" (the legacy layout; text_offset from offset)."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


def chat_response(rid: str, model: str, created: int, message: dict, finish_reason: str, use: dict,
                  logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": use, "system_fingerprint": None}


def chat_chunk(rid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
               use: dict | None = None, with_usage: bool = False, logprobs: dict | None = None) -> dict:
    """One SSE chunk; delta None = the usage-only chunk (choices [])."""
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None,
             "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                   "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = use
    return chunk


def completion_response(rid: str, model: str, created: int, text: str, finish_reason: str | None,
                        use: dict | None, stream: bool = False, with_usage: bool = False,
                        logprobs: dict | None = None) -> dict:
    """A /v1/completions response, or with stream=True one chunk of it (text None = the usage-only chunk)."""
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
           "choices": [] if text is None else [{"index": 0, "text": text, "logprobs": logprobs,
                                                "finish_reason": finish_reason}]}
    if not stream or with_usage:
        out["usage"] = use
    return out


def model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edgemoe"}


def now() -> int:
    return int(time.time())
