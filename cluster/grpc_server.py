"""The cluster's gRPC front end: serves `pdserve.v1.PDServe` (proto/serving.proto: Generate streams a
request's output, ListModels names the model) beside the standard `grpc.health.v1.Health` service
(SERVING / NOT_SERVING for "" and "pdserve.v1.PDServe", set with `set_serving`) and server
reflection, on one grpc.aio server.

    client ── Generate(GenerateRequest) ──► SamplingParams from the fields that are set
                                            Backend.prepare(model, params, prompt | token_ids | messages)
           ◄─ GenerateResponse{delta}* ◄─── Backend.generate(request id, prompt ids, params): Delta*
           ◄─ GenerateResponse{final}  ◄─── ... then one Final (usage, timings)
    cancel ──────────────────────────────► the backend's generator is closed: the cluster aborts it

Auth: with an `auth_token`, every PDServe call must carry the metadata
`authorization: Bearer <token>` (compared in constant time), else it ends with UNAUTHENTICATED.
Health and reflection stay open, so load balancers can probe without the token.

Errors, before or during the stream, end the call with the status `cluster.protocol.status_of` maps
the error to: INVALID_ARGUMENT (bad prompt or sampling parameters), NOT_FOUND (unknown model),
RESOURCE_EXHAUSTED (Overloaded: retry later), UNAVAILABLE (no healthy instance), UNAUTHENTICATED, and
INTERNAL for anything else (logged; the client gets no internals). A request that is not valid
protobuf is INVALID_ARGUMENT too (the handlers take raw bytes and parse them here: gRPC's own
deserializer failure would be INTERNAL). A request that fails inside the cluster after it started
ends differently: the backend yields a Final with finish_reason "error" and its `error` text, which is
sent as the last message of a stream that completes with OK. Every error status is counted in
`metrics.rejected` by its code name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import uuid
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.metrics import Metrics
from cluster.protocol import Backend, Delta, Final, status_of
from engine.sampling_params import SamplingParams
from kv_transfer.stubs import load as load_stubs

pb2, _ = load_stubs("serving")
logger = logging.getLogger(__name__)

SERVICE = pb2.DESCRIPTOR.services_by_name["PDServe"].full_name  # "pdserve.v1.PDServe"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
_HealthStatus = health_pb2.HealthCheckResponse


class _Rejected(Exception):
    """Ends the call with `code` and `message` (raised by the checks before any backend call)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse(message_type: Any, data: bytes) -> Any:
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise _Rejected(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {message_type.__name__}: {exc}"
        ) from None


def sampling_params(message: Any) -> SamplingParams:
    """SamplingParams from a pdserve.v1.SamplingParams: the optional fields that are set and the
    repeated fields that are not empty (ListFields lists exactly those); the rest take the engine's
    defaults. Raises InvalidSamplingParamsError naming a bad value."""
    values: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.is_repeated:
            value = list(value)
        elif field.type == field.TYPE_FLOAT:
            value = float(f"{value:.7g}")  # float32 on the wire: 0.7 arrives as 0.699999988...
        values[field.name] = value
    return SamplingParams.from_dict(values)


def _prompt_input(request: Any) -> dict[str, Any]:
    """The request's prompt as Backend.prepare's keyword arguments (none when no input is set)."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return {"prompt": request.prompt}
    if kind == "token_ids":
        return {"token_ids": list(request.token_ids.ids)}
    if kind == "messages":
        return {"messages": [{"role": m.role, "content": m.content} for m in request.messages.messages]}
    return {}


def _delta_message(delta: Delta) -> Any:
    logprobs = [
        pb2.TokenLogprobs(
            logprob=lp.logprob,
            top_token_ids=[token for token, _ in lp.top],
            top_logprobs=[logprob for _, logprob in lp.top],
        )
        for lp in delta.logprobs or ()
    ]
    return pb2.GenerateResponse(
        delta=pb2.Delta(token_ids=list(delta.token_ids), text=delta.text, logprobs=logprobs)
    )


def _final_message(final: Final) -> Any:
    return pb2.GenerateResponse(
        final=pb2.Final(
            request_id=final.request_id,
            finish_reason=final.finish_reason,
            usage=pb2.Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens),
            timings=pb2.Timings(**dataclasses.asdict(final.timings)),
            error=final.error,
        )
    )


class GrpcServer:
    """Serves PDServe, health and reflection on `host:port` (port 0: any free port; `port` tells which
    after `start`), calling `backend` for every request.

    auth_token: the token PDServe calls must present as "authorization: Bearer <token>".
    max_message_bytes: the largest request or response message, either way.
    """

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 50051,
        auth_token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
        self.backend = backend
        self.metrics = metrics
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self._expected_auth = f"Bearer {auth_token}".encode() if auth_token is not None else None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = True
        self._health_updates: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Bind and start serving; raises OSError when the address cannot be bound."""
        if self._server is not None:
            raise RuntimeError("the gRPC server is already started")
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),  # port 0 gets a port of its own; a taken port fails to bind
        ]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((self._pdserve_handler(),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection([SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
        try:
            bound = server.add_insecure_port(_hostport(self.host, self.port))
        except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
            raise OSError(f"cannot serve gRPC on {_hostport(self.host, self.port)}: {exc}") from exc
        if bound == 0:
            raise OSError(f"cannot serve gRPC on {_hostport(self.host, self.port)}")
        self.port = bound
        self._loop = asyncio.get_running_loop()
        self._server = server
        await self._apply_serving()
        await server.start()
        logger.info("gRPC front end serving %s on %s", SERVICE, _hostport(self.host, bound))

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, and give running streams `grace` seconds to finish;
        those still running then are cancelled (their requests aborted in the cluster)."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        self._server = None
        self._loop = None

    def set_serving(self, serving: bool) -> None:
        """The health status of "" and "pdserve.v1.PDServe": SERVING or NOT_SERVING. Callable from the
        server's event loop (takes effect before the next call is served) or from another thread
        (waits until it took effect); before `start`, it is applied when the server starts."""
        self._serving = serving
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(self._apply_serving())
            self._health_updates.add(task)  # keep a reference until it ran
            task.add_done_callback(self._health_updates.discard)
        else:
            asyncio.run_coroutine_threadsafe(self._apply_serving(), loop).result(timeout=10)

    async def _apply_serving(self) -> None:
        status = _HealthStatus.SERVING if self._serving else _HealthStatus.NOT_SERVING
        for service in ("", SERVICE):
            await self._health.set(service, status)

    # --- PDServe -----------------------------------------------------------------------------------

    def _pdserve_handler(self) -> grpc.GenericRpcHandler:
        """PDServe's methods, taking the request as raw bytes (request_deserializer=None) so that a
        malformed one is INVALID_ARGUMENT, not the INTERNAL gRPC gives a failed deserializer."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self._generate, response_serializer=pb2.GenerateResponse.SerializeToString
                ),
                "ListModels": grpc.unary_unary_rpc_method_handler(
                    self._list_models, response_serializer=pb2.ListModelsResponse.SerializeToString
                ),
            },
        )

    async def _list_models(self, data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._authorize(context)
            _parse(pb2.ListModelsRequest, data)
        except _Rejected as exc:
            await self._abort(context, exc.code, exc.message)
        card = self.backend.model
        return pb2.ListModelsResponse(
            models=[pb2.ModelInfo(id=card.id, max_model_len=card.max_model_len, dtype=card.dtype)]
        )

    async def _generate(self, data: bytes, context: grpc.aio.ServicerContext) -> None:
        """Streams the request's deltas then its final message with context.write: a coroutine, not
        an async generator, so that a client's cancellation (which cancels this task) closes the
        backend's generator here, at once."""
        error = None
        try:
            self._authorize(context)
            request = _parse(pb2.GenerateRequest, data)
            request_id = request.request_id or uuid.uuid4().hex
            params = sampling_params(request.sampling)
            prompt_ids = self.backend.prepare(request.model, params, **_prompt_input(request))
            async with contextlib.aclosing(self.backend.generate(request_id, prompt_ids, params)) as events:
                async for event in events:
                    if isinstance(event, Final):
                        await context.write(_final_message(event))
                        return
                    await context.write(_delta_message(event))
            raise RuntimeError(f"the backend's stream of {request_id!r} ended without a final event")
        except _Rejected as exc:
            error = exc.code, exc.message
        except Exception as exc:  # not BaseException: a cancellation propagates (and closed `events`)
            error = self._status(exc)
        await self._abort(context, *error)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected_auth is None:
            return
        presented = dict(context.invocation_metadata() or ()).get("authorization")
        if presented is None:
            raise _Rejected(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing auth token: send the metadata 'authorization: Bearer <token>'",
            )
        if not hmac.compare_digest(presented.encode(), self._expected_auth):
            raise _Rejected(
                grpc.StatusCode.UNAUTHENTICATED, "wrong auth token in the 'authorization' metadata"
            )

    @staticmethod
    def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
        name, _ = status_of(exc)
        if name == "INTERNAL":
            logger.exception("gRPC Generate failed")
            return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
        return grpc.StatusCode[name], str(exc)

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        """Count the rejection and end the call with `code` (raises, as context.abort does)."""
        self.metrics.rejected.labels(code.name).inc()
        await context.abort(code, message)
