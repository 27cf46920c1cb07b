"""The HTTP side of `edgemoe serve` (Starlette over uvicorn): routes, API key, body limits, SSE streaming.

Every error reaches the client as OpenAI's error object with a fitting status (400 bad request, 401 API key, 404
unknown model or route, 405, 413 body too large, 503 queue full or shutting down, 500 an engine failure); nothing
raises out of a route, so the server outlives any request.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..chat_template import PLAIN_TRANSCRIPT_STOPS, render_plain_transcript
from ..errors import EdgeMoEError
from . import openai_api as api
from .json_constraint import JsonConstraint, TokenIndex
from .openai_api import APIError
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown
from .tool_calls import ToolPlan, plan_tools

MAX_BODY = 8 << 20  # bytes of JSON a request may send
POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class Events:
    """The scheduler thread's events for one request, delivered to the request's asyncio task."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._q = loop, asyncio.Queue()

    def emit(self, kind: str, value) -> None:  # worker thread
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
            pass

    async def get(self, timeout: float | None = None):
        return await asyncio.wait_for(self._q.get(), timeout)


class Server:
    """One model behind OpenAI's endpoints. model: an edgemoe Model (the scheduler's worker thread owns it)."""

    def __init__(self, model, model_id: str | None = None, api_key: str | None = None, max_queue: int = 64):
        self.model = model
        self.model_id = model_id or Path(model.container.path).stem
        self.model_ids = (self.model_id, Path(model.container.path).name)
        self.api_key = api_key
        self.created = api.now()
        self.scheduler = Scheduler(model, max_queue)
        self._token_index: TokenIndex | None = None  # built on the first constrained request

    def close(self) -> None:
        self.scheduler.close()

    # --- plumbing ---------------------------------------------------------------------------------------------
    def app(self) -> Starlette:
        def route(path, fn, methods):
            return Route(path, self._guard(fn), methods=methods)

        return Starlette(
            routes=[route("/health", self.health, ["GET"]), route("/v1/models", self.models, ["GET"]),
                    route("/v1/models/{model_id:path}", self.model_info, ["GET"]),
                    route("/v1/chat/completions", self.chat, ["POST"]),
                    route("/v1/completions", self.completions, ["POST"])],
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},
        )

    def _guard(self, fn):
        async def endpoint(request: Request):
            try:
                if self.api_key is not None and request.url.path.startswith("/v1/"):
                    self._check_key(request)
                return await fn(request)
            except APIError as e:
                return JSONResponse(e.body(), status_code=e.status)

        return endpoint

    def _check_key(self, request: Request) -> None:
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not given:
            raise APIError(401, "no API key given: send the header 'Authorization: Bearer KEY' (the key the server "
                                "was started with, --api-key)", None, "invalid_api_key")
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key provided", None, "invalid_api_key")

    async def _http_error(self, request: Request, exc: HTTPException):
        msg = {404: f"no route {request.method} {request.url.path} (this server has /v1/chat/completions, "
                    f"/v1/completions, /v1/models, /health)",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return JSONResponse(APIError(exc.status_code, msg).body(), status_code=exc.status_code)

    async def _internal_error(self, request: Request, exc: Exception):
        print(f"edgemoe serve: internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    async def _json_body(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            raise APIError(413, f"the request body has {size} bytes; the limit is {MAX_BODY}", None,
                           "request_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_BODY:
                raise APIError(413, f"the request body exceeds the limit of {MAX_BODY} bytes", None,
                               "request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None

    # --- routes -----------------------------------------------------------------------------------------------
    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.model_id, **self.scheduler.load()})

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [api.model_object(self.model_id, self.created)]})

    async def model_info(self, request: Request):
        name = request.path_params["model_id"]
        if name not in self.model_ids:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves {self.model_id!r}",
                           "model", "model_not_found")
        return JSONResponse(api.model_object(self.model_id, self.created))

    async def chat(self, request: Request):
        body = await self._json_body(request)
        api.check_fields(body, api.CHAT_FIELDS, "/v1/chat/completions")
        api.check_model(body, self.model_ids)
        opts = api.sampling_options(body, self.model.spec.vocab, "max_completion_tokens")
        messages = api.chat_messages(body)
        if body.get("top_logprobs") is not None:
            raise APIError(400, "'top_logprobs' is not supported by edgemoe serve", "top_logprobs",
                           "unsupported_parameter")
        if self.model.tokenizer is None:
            raise APIError(400, f"{self.model_ids[1]} has no tokenizer embedded: chat needs one (use /v1/completions "
                                f"with token ids)", None, "unsupported_model")
        tools = plan_tools(body, self.model.chat_template)
        node = api.response_format_node(body.get("response_format"))
        if node is not None and tools.forced:
            raise APIError(400, "'response_format' and a forced tool call ('tool_choice') cannot be combined",
                           "response_format", "invalid_value")
        prompt, template_stops = self._chat_prompt(messages, tools)
        constraint_node = tools.call_node() if tools.forced else node
        if constraint_node is None:
            opts.decoding.stops += template_stops
        rid = api.new_id("chatcmpl")
        job, events = self._submit(self._encode(prompt), opts, constraint_node)
        if opts.stream:
            return self._stream(request, job, events, self._chat_chunks(rid, job, events, opts, tools))
        text, reason = await self._collect(request, job, events)
        message = {"role": "assistant", "content": text, "refusal": None}
        calls = tools.parse(text)
        if calls:
            message |= {"content": tools.content_before(text), "tool_calls": calls}
            reason = "tool_calls"
        return JSONResponse(api.chat_response(rid, self.model_id, api.now(), message, reason, self._usage(job)))

    async def completions(self, request: Request):
        body = await self._json_body(request)
        api.check_fields(body, api.COMPLETION_FIELDS, "/v1/completions")
        api.check_model(body, self.model_ids)
        opts = api.sampling_options(body, self.model.spec.vocab)
        prompt = api.completion_prompt(body, self.model.spec.vocab)
        ids = self._encode(prompt) if isinstance(prompt, str) else self._check_length(prompt)
        rid = api.new_id("cmpl")
        job, events = self._submit(ids, opts, None)
        if opts.stream:
            return self._stream(request, job, events, self._completion_chunks(rid, job, events, opts))
        text, reason = await self._collect(request, job, events)
        return JSONResponse(api.completion_response(rid, self.model_id, api.now(), text, reason, self._usage(job)))

    # --- helpers ----------------------------------------------------------------------------------------------
    def _chat_prompt(self, messages: list[dict], tools: ToolPlan) -> tuple[str, list[str]]:
        """The prompt and the stop strings that end the reply, as Model.chat makes them (+ tools)."""
        try:
            if self.model.chat_template is not None:
                prompt = self.model.apply_chat_template(messages, add_generation_prompt=True, **tools.template_vars())
                eos = self.model._chat_tokens().get("eos_token")
                return prompt + tools.prompt_suffix(), [eos] if eos else []
            return render_plain_transcript(messages, add_generation_prompt=True), list(PLAIN_TRANSCRIPT_STOPS)
        except EdgeMoEError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None

    def _encode(self, text: str) -> list[int]:
        if self.model.tokenizer is None:
            raise APIError(400, f"{self.model_ids[1]} has no tokenizer embedded: send the prompt as token ids",
                           "prompt", "unsupported_model")
        return self._check_length(self.model.encode(text))

    def _check_length(self, ids: list[int]) -> list[int]:
        if len(ids) >= self.model.max_ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the context holds {self.model.max_ctx} (prompt "
                                f"+ reply; the server's --max-ctx, at most the model's {self.model.spec.max_position})",
                           "messages", "context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt is empty (no tokens)", "prompt", "invalid_value")
        return ids

    def _submit(self, ids: list[int], opts: api.Options, node) -> tuple[Job, Events]:
        room = self.model.max_ctx - len(ids)
        opts.decoding.max_new_tokens = min(opts.max_tokens or room, room)
        constraint = None
        if node is not None:
            if self.model.tokenizer is None:
                raise APIError(400, "JSON output needs the model's tokenizer", "response_format", "unsupported_model")
            if self._token_index is None:
                self._token_index = TokenIndex(self.model.tokenizer, self.model.spec.vocab)
            constraint = JsonConstraint(node, self._token_index)
        events = Events(asyncio.get_running_loop())
        job = Job(ids, opts.decoding, events.emit, constraint)
        try:
            self.scheduler.submit(job)
        except (QueueFull, ShuttingDown) as e:
            raise APIError(503, str(e), None, "overloaded" if isinstance(e, QueueFull) else "shutting_down") from None
        return job, events

    def _usage(self, job: Job) -> dict:
        return api.usage(len(job.ids), job.n_completion, job.n_cached)

    async def _collect(self, request: Request, job: Job, events: Events) -> tuple[str, str]:
        """The whole text of a non-streaming request; a client that goes away cancels it."""
        pieces = []
        while True:
            try:
                kind, value = await events.get(POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.scheduler.cancel(job)
                    raise APIError(499, "the client disconnected") from None
                continue
            if kind == "text":
                pieces.append(value)
            elif kind == "done":
                return "".join(pieces), value
            else:
                raise APIError(500 if value != "the server is shutting down" else 503, f"generation failed: {value}")

    def _stream(self, request: Request, job: Job, events: Events, chunks):
        async def sse():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the task is cancelled) or the stream ended: free the slot either way
                if job.finish_reason is None:
                    self.scheduler.cancel(job)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, events: Events):
        """text pieces until the end; an error becomes an error object in the stream (OpenAI clients raise it)."""
        while True:
            kind, value = await events.get()
            if kind == "error":
                raise APIError(500, f"generation failed: {value}")
            yield kind, value
            if kind == "done":
                return

    async def _chat_chunks(self, rid, job, events, opts, tools: ToolPlan):
        created = api.now()

        def chunk(delta, reason=None):
            return api.chat_chunk(rid, self.model_id, created, delta, reason, None, opts.include_usage)

        yield chunk({"role": "assistant", "content": "", "refusal": None})
        text, held = [], tools.stream_filter()
        try:
            async for kind, value in self._events(events):
                if kind == "text":
                    text.append(value)
                    shown = held.push(value)
                    if shown:
                        yield chunk({"content": shown})
                    continue
                reason = value
                rest = held.flush()
                if rest:
                    yield chunk({"content": rest})
                calls = tools.parse("".join(text))
                if calls:
                    yield chunk({"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]})
                    reason = "tool_calls"
                yield chunk({}, reason)
                if opts.include_usage:
                    yield api.chat_chunk(rid, self.model_id, created, None, None, self._usage(job), True)
        except APIError as e:
            yield e.body()

    async def _completion_chunks(self, rid, job, events, opts):
        created = api.now()
        try:
            async for kind, value in self._events(events):
                if kind == "text":
                    yield api.completion_response(rid, self.model_id, created, value, None, None, True,
                                                  opts.include_usage)
                    continue
                yield api.completion_response(rid, self.model_id, created, "", value, None, True, opts.include_usage)
                if opts.include_usage:
                    yield api.completion_response(rid, self.model_id, created, None, None, self._usage(job), True,
                                                  True)
        except APIError as e:
            yield e.body()
