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

from . import openai_api as api
from .openai_api import APIError
from .prepare import Prepared, Preparer
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

MAX_BODY = 8 << 20  # bytes of JSON a request may send
POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
SHUTTING_DOWN = "the server is shutting down"


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
        self.prepare = Preparer(model, self.model_ids)
        self.scheduler = Scheduler(model, max_queue)

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
        return await self._run(request, self.prepare.chat(await self._json_body(request)))

    async def completions(self, request: Request):
        return await self._run(request, self.prepare.completion(await self._json_body(request)))

    # --- running a request ------------------------------------------------------------------------------------
    async def _run(self, request: Request, prep: Prepared):
        events = Events(asyncio.get_running_loop())
        job = Job(prep.ids, prep.opts.decoding, events.emit, prep.constraint)
        prep.entries = lambda: job.seq.logprobs if job.seq is not None else []
        try:
            self.scheduler.submit(job)
        except (QueueFull, ShuttingDown) as e:
            raise APIError(503, str(e), None, "overloaded" if isinstance(e, QueueFull) else "shutting_down") from None
        if prep.opts.stream:
            return self._stream(job, events, prep)
        text, reason = await self._collect(request, job, events)
        return JSONResponse(prep.response(text, reason, self._usage(job)))

    def _usage(self, job: Job) -> dict:
        return api.usage(len(job.ids), job.n_completion, job.n_cached)

    async def _collect(self, request: Request, job: Job, events: Events) -> tuple[str, str]:
        """The whole text of a non-streaming request; a client that goes away cancels it."""
        pieces = []
        while True:
            try:
                kind, value = await events.get(POLL_S)
            except asyncio.CancelledError:  # the server stops and cancels what still runs
                self.scheduler.cancel(job)
                raise
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
                raise APIError(503 if value == SHUTTING_DOWN else 500, f"generation failed: {value}")

    def _stream(self, job: Job, events: Events, prep: Prepared):
        def sse(chunk: dict) -> str:
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def body():
            try:
                for chunk in prep.first_chunks():
                    yield sse(chunk)
                while True:
                    kind, value = await events.get()
                    for chunk in prep.event_chunks(kind, value, lambda: self._usage(job)):
                        yield sse(chunk)
                    if kind != "text":
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the task is cancelled) or the stream ended: free the slot either way
                if job.finish_reason is None:
                    self.scheduler.cancel(job)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
