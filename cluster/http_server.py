"""The OpenAI-compatible HTTP front end (aiohttp):

    POST /v1/completions, /v1/chat/completions   JSON, or server-sent events with "stream": true
    GET  /v1/models                              the model this cluster serves
    GET  /health                                 200 while the backend is healthy, else 503
    GET  /metrics                                Prometheus text exposition

Auth: when an auth token is set, every path except /health and /metrics needs the header
`Authorization: Bearer <token>` (401 otherwise); those two stay open for load balancers and scrapers.

Errors are OpenAI's JSON `{"error": {"message", "type", "param", "code"}}`, `code` being the gRPC
status name, with the HTTP status `status_of` gives: 400 malformed JSON, wrong types, a bad prompt
or sampling value, an unsupported field; 401 a missing or wrong token; 404 an unknown model (or
path); 429 overloaded, retry later; 503 no healthy instance, or the cluster aborted the request; 500
anything else, including a generation that failed part-way. Once a stream has started, an error is
sent in-band as `data: {"error": ...}` then `data: [DONE]`. Every error counts in
`pdserve_rejected_requests{code}`.

A client that disconnects cancels its handler, which closes the backend's event iterator, which
aborts the request in the cluster.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from cluster.metrics import CONTENT_TYPE, Metrics
from cluster.openai_protocol import (
    BadRequest,
    ChatFormat,
    CompletionFormat,
    OpenAIRequest,
    error_body,
    parse_chat_request,
    parse_completion_request,
    token_namer,
)
from cluster.protocol import Backend, Delta, Final, Unauthenticated, Unavailable, status_of
from engine.errors import PDServeError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20  # a full context of token ids as JSON fits many times over
_OPEN_PATHS = frozenset({"/health", "/metrics"})
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_AnyFormat = CompletionFormat | ChatFormat


class GenerationFailed(PDServeError, RuntimeError):
    """A request the cluster ended with finish_reason "error" (INTERNAL / 500)."""


def build_app(backend: Backend, metrics: Metrics, auth_token: str | None = None) -> web.Application:
    api = _OpenAIApi(backend, metrics)
    app = web.Application(
        middlewares=[_error_middleware(metrics), _auth_middleware(auth_token)],
        client_max_size=MAX_BODY_BYTES,
    )
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.metrics_text)
    return app


class HttpServer:
    """Serves `build_app` on host:port; port 0 picks a free port, `.port` is the bound one after start."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 8000,
        auth_token: str | None = None,
    ) -> None:
        self.app = build_app(backend, metrics, auth_token)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, aborting its request.
        runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=5.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


class _OpenAIApi:
    def __init__(self, backend: Backend, metrics: Metrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.token_text = token_namer(backend)
        self.created = int(time.time())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_completion_request(await _json_object(request))
        return await self._generate(request, req, self._format(CompletionFormat, req))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_chat_request(await _json_object(request))
        return await self._generate(request, req, self._format(ChatFormat, req))

    async def models(self, request: web.Request) -> web.Response:
        card = self.backend.model
        model = {
            "id": card.id,
            "object": "model",
            "created": self.created,
            "owned_by": "pdserve",
            "max_model_len": card.max_model_len,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        healthy = self.backend.is_healthy()
        return web.json_response({"status": "ok" if healthy else "unhealthy"}, status=200 if healthy else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    def _format(self, kind: type[_AnyFormat], req: OpenAIRequest) -> _AnyFormat:
        logprobs = req.params.logprobs is not None
        return kind(self.backend.model.id, self.token_text, logprobs, req.include_usage)

    async def _generate(
        self, request: web.Request, req: OpenAIRequest, fmt: _AnyFormat
    ) -> web.StreamResponse:
        prompt_ids = self.backend.prepare(req.model, req.params, **req.prompt_kwargs())
        events = self.backend.generate(uuid.uuid4().hex, prompt_ids, req.params)
        try:
            # Wait for the first event before answering, so that a refusal (overloaded, unavailable)
            # is a plain HTTP status even for a stream.
            first = await _next_event(events)
            error = _error_of(first)
            if error is not None:
                raise error
            if req.stream:
                return await self._stream(request, fmt, first, events)
            return web.json_response(await _collect(fmt, first, events))
        finally:
            await _close(events)  # a no-op after the Final; before it (a disconnect), aborts the request

    async def _stream(
        self,
        request: web.Request,
        fmt: _AnyFormat,
        first: Delta | Final,
        events: AsyncIterator[Delta | Final],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        event: Delta | Final | Exception = first
        try:
            for chunk in fmt.first_chunks():
                await _send(response, chunk)
            while isinstance(event, Delta):
                chunk = fmt.delta_chunk(event)
                if chunk is not None:
                    await _send(response, chunk)
                event = await _next_event(events)
            error = _error_of(event)
            if error is not None:
                await _send(response, _error_reply(self.metrics, error)[1])
            else:
                await _send(response, fmt.finish_chunk(event))
                if fmt.include_usage:
                    await _send(response, fmt.usage_chunk(event))
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass  # the client left; the caller closes the events, which aborts the request
        return response


async def _collect(
    fmt: _AnyFormat, first: Delta | Final, events: AsyncIterator[Delta | Final]
) -> dict[str, Any]:
    deltas = []
    event: Delta | Final | Exception = first
    while isinstance(event, Delta):
        deltas.append(event)
        event = await _next_event(events)
    error = _error_of(event)
    if error is not None:
        raise error
    return fmt.response(deltas, event)


async def _next_event(events: AsyncIterator[Delta | Final]) -> Delta | Final | Exception:
    """The next event, or the error the backend raised instead of it."""
    try:
        event = await anext(events)
    except StopAsyncIteration:
        return RuntimeError("the backend's event stream ended without a Final event")
    except Exception as exc:  # a stream reports it in-band, a plain request as its status
        return exc
    if isinstance(event, Final):
        await _run_to_end(events)
    return event


async def _run_to_end(events: AsyncIterator[Delta | Final]) -> None:
    """Let the generator finish after its Final, so that closing it is not taken for an abort."""
    try:
        extra = await anext(events)
    except StopAsyncIteration:
        return
    except Exception:
        log.exception("the backend failed after its Final event")
        return
    log.error("the backend sent %r after its Final event; ignored", extra)


def _error_of(event: Delta | Final | Exception) -> Exception | None:
    """What failed, if `event` says something did: the backend's error, or a Final that did not finish."""
    if isinstance(event, Exception):
        return event
    if isinstance(event, Final) and event.finish_reason == "error":
        return GenerationFailed(event.error or "the generation failed")
    if isinstance(event, Final) and event.finish_reason == "abort":
        return Unavailable("the cluster aborted the request before it finished; retry it")
    return None


async def _close(events: AsyncIterator[Delta | Final]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _error_reply(metrics: Metrics, exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body for `exc`, counted as a rejection."""
    code, status = ("INVALID_ARGUMENT", 400) if isinstance(exc, BadRequest) else status_of(exc)
    metrics.rejected.labels(code).inc()
    if isinstance(exc, PDServeError):
        message = str(exc)
    else:
        log.error("internal error serving a request", exc_info=exc)
        message = f"internal server error ({type(exc).__name__}: {exc})"
    return status, error_body(message, status, code, getattr(exc, "param", None))


_HTTP_CODES = {401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "INVALID_ARGUMENT"}


def _error_middleware(metrics: Metrics) -> Callable[[web.Request, _Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def errors_as_json(request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: no such path, wrong method, body too large
            if exc.status < 400:
                raise
            code = _HTTP_CODES.get(exc.status, "INVALID_ARGUMENT" if exc.status < 500 else "INTERNAL")
            metrics.rejected.labels(code).inc()
            message = f"{request.method} {request.path}: {exc.text}"
            return web.json_response(error_body(message, exc.status, code), status=exc.status)
        except Exception as exc:
            status, body = _error_reply(metrics, exc)
            return web.json_response(body, status=status)

    return errors_as_json


def _auth_middleware(token: str | None) -> Callable[[web.Request, _Handler], Awaitable[web.StreamResponse]]:
    expected = token.encode() if token is not None else None

    @web.middleware
    async def bearer_auth(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if expected is not None and request.path not in _OPEN_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                raise Unauthenticated(
                    "this server needs an API key: send the header 'Authorization: Bearer <token>'"
                )
            if not hmac.compare_digest(given.strip().encode(), expected):
                raise Unauthenticated("the API key (Authorization: Bearer token) is wrong")
        return await handler(request)

    return bearer_auth
