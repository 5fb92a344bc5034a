"""The gRPC front end on a real grpc.aio server (port 0, its own event loop in a background thread)
with the scripted backend, called by a real grpc client: streams for the three prompt forms,
logprobs, sampling fields, ListModels, health, reflection, every bad request's status and message,
backend errors, auth, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from scripted_backend import MODEL_ID, ScriptedBackend

from cluster.grpc_server import GrpcServer
from cluster.metrics import Metrics
from cluster.protocol import Final, Overloaded, Timings, Unavailable
from engine.sampling_params import SamplingParams
from kv_transfer.stubs import load

pb2, pb2_grpc = load("serving")
TOKEN = "sesame-open-1234"
REPLY = " Paris is the capital."
Status = health_pb2.HealthCheckResponse


class LoopThread:
    """An asyncio event loop running in a daemon thread; `run` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def backend() -> ScriptedBackend:
    return ScriptedBackend(REPLY, max_tokens_limit=256)


@pytest.fixture(autouse=True)
def fresh_backend(request) -> None:
    """Each test starts with a backend that streams its reply at once and records nothing yet."""
    if "backend" in request.fixturenames:
        backend = request.getfixturevalue("backend")
        backend.error, backend.delay = None, 0.0
        for records in (backend.started, backend.cancelled, backend.finished):
            records.clear()


def start_server(loop: LoopThread, backend: ScriptedBackend, **kwargs) -> GrpcServer:
    server = GrpcServer(backend, Metrics(), port=0, **kwargs)
    loop.run(server.start())
    assert server.port > 0
    return server


@pytest.fixture(scope="module")
def server(loop, backend) -> Iterator[GrpcServer]:
    server = start_server(loop, backend)
    yield server
    loop.run(server.stop(grace=0))


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb2_grpc.PDServeStub(channel)


@pytest.fixture(scope="module")
def auth_server(loop, backend) -> Iterator[GrpcServer]:
    server = start_server(loop, backend, auth_token=TOKEN)
    yield server
    loop.run(server.stop(grace=0))


@pytest.fixture(scope="module")
def auth_channel(auth_server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        yield channel


def generate(stub, metadata=None, **fields) -> list:
    return list(stub.Generate(pb2.GenerateRequest(**fields), timeout=10, metadata=metadata))


def split(responses: list) -> tuple[list, object]:
    """(the deltas, the final) of a stream, checking the final comes last and only once."""
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds[-1] == "final" and kinds.count("final") == 1, kinds
    return [r.delta for r in responses[:-1]], responses[-1].final


def rejected(server: GrpcServer, code: str) -> float:
    value = server.metrics.registry.get_sample_value("pdserve_rejected_requests_total", {"code": code})
    return value or 0.0


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --- streams -------------------------------------------------------------------------------------


def test_prompt_streams_the_reply_then_a_final_with_usage_and_timings(stub, backend):
    deltas, final = split(generate(stub, prompt="The capital of France is", request_id="req-1"))
    assert [t for d in deltas for t in d.token_ids] == backend.reply_ids
    assert "".join(d.text for d in deltas) == REPLY
    prompt_ids = backend.tokenizer.encode("The capital of France is")
    assert backend.started[0][:2] == ("req-1", prompt_ids)
    assert final.request_id == "req-1" and final.finish_reason == "stop" and final.error == ""
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (
        len(prompt_ids),
        len(backend.reply_ids),
    )
    timings = final.timings
    got = (timings.queued, timings.ttft, timings.transfer, timings.prefill, timings.tpot, timings.e2e)
    assert got == pytest.approx((0.001, 0.01, 0.002, 0.004, 0.005, 0.05))
    assert all(not d.logprobs for d in deltas)  # not asked for


def test_token_ids_stream_and_the_server_assigns_a_request_id(stub, backend):
    deltas, final = split(generate(stub, token_ids=pb2.TokenIds(ids=[1, 2, 3])))
    assert "".join(d.text for d in deltas) == REPLY
    assert re.fullmatch(r"[0-9a-f]{32}", final.request_id)
    assert backend.started[0][:2] == (final.request_id, [1, 2, 3])
    assert final.usage.prompt_tokens == 3


def test_chat_messages_are_rendered_with_the_chat_template(stub, backend):
    chat = [pb2.ChatMessage(role="system", content="Be brief."), pb2.ChatMessage(role="user", content="Hi")]
    deltas, final = split(generate(stub, messages=pb2.ChatMessages(messages=chat)))
    expected = backend.prepare(
        "",
        SamplingParams(),
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    )
    assert backend.started[0][1] == expected
    assert final.usage.prompt_tokens == len(expected) and "".join(d.text for d in deltas) == REPLY


def test_sampling_fields_that_are_set_reach_the_backend_and_the_rest_keep_their_defaults(stub, backend):
    sampling = pb2.SamplingParams(
        max_tokens=3, temperature=0.7, top_p=0.9, seed=7, stop=["\n\n"], stop_token_ids=[2], ignore_eos=False
    )
    deltas, final = split(generate(stub, model=MODEL_ID, prompt="Hi", sampling=sampling))
    assert backend.started[0][2] == SamplingParams(
        max_tokens=3, temperature=0.7, top_p=0.9, seed=7, stop=("\n\n",), stop_token_ids=(2,)
    )
    assert len(deltas) == 3 and final.finish_reason == "length" and final.usage.completion_tokens == 3


def test_logprobs_stream_with_their_top_alternatives(stub, backend):
    deltas, _ = split(generate(stub, prompt="Hi", sampling=pb2.SamplingParams(logprobs=2)))
    for delta, token in zip(deltas, backend.reply_ids, strict=True):
        (lp,) = delta.logprobs
        assert lp.logprob == pytest.approx(-0.5)
        assert list(lp.top_token_ids) == [token, token + 1]
        assert list(lp.top_logprobs) == pytest.approx([-0.5, -1.5])


def test_a_request_that_fails_in_the_cluster_ends_with_an_error_final_and_status_ok(
    stub, backend, monkeypatch
):
    async def failing(request_id, prompt_ids, params):
        yield Final(
            request_id, "error", len(prompt_ids), 0, Timings(e2e=0.1), error="decode instance d0 died"
        )

    monkeypatch.setattr(backend, "generate", failing)
    call = stub.Generate(pb2.GenerateRequest(prompt="Hi", request_id="r-err"), timeout=10)
    (response,) = list(call)
    assert response.final.finish_reason == "error" and response.final.error == "decode instance d0 died"
    assert call.code() == grpc.StatusCode.OK


def test_list_models_names_the_backends_model(stub):
    (model,) = stub.ListModels(pb2.ListModelsRequest(), timeout=10).models
    assert (model.id, model.max_model_len, model.dtype) == (MODEL_ID, 2048, "float32")


# --- bad requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "the prompt is empty"),
        ({}, "give exactly one of prompt, token_ids or messages (got none)"),
        ({"token_ids": pb2.TokenIds(ids=[5, 49152])}, "token ids [49152] are outside the vocabulary"),
        (
            {"token_ids": pb2.TokenIds(ids=[1] * 2048)},
            "the prompt has 2048 tokens but the context holds 2048",
        ),
        ({"prompt": "Hi", "sampling": pb2.SamplingParams(temperature=-1)}, "temperature must be"),
        (
            {"prompt": "Hi", "sampling": pb2.SamplingParams(max_tokens=1000)},
            "over this server's limit of 256",
        ),
        (
            {"prompt": "Hi", "sampling": pb2.SamplingParams(top_p=1.5)},
            "top_p must be a number in (0, 1], got 1.5",
        ),
    ],
    ids=["empty-prompt", "no-input", "out-of-vocab", "too-long", "temperature", "max-tokens", "top-p"],
)
def test_bad_requests_are_invalid_argument_naming_the_problem(stub, server, backend, fields, message):
    before = rejected(server, "INVALID_ARGUMENT")
    error = error_of(lambda: generate(stub, **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert backend.started == []  # refused before reaching the cluster
    assert rejected(server, "INVALID_ARGUMENT") == before + 1


def test_malformed_protobuf_is_invalid_argument(channel, server, backend):
    raw = channel.unary_stream(
        f"/{pb2.DESCRIPTOR.services_by_name['PDServe'].full_name}/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb2.GenerateResponse.FromString,
    )
    garbage = b"\x1a\x40truncated"  # field 3 (prompt) says 64 bytes follow; 9 do
    error = error_of(lambda: list(raw(garbage, timeout=10)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid GenerateRequest" in error.details()
    assert backend.started == []


def test_unknown_model_is_not_found(stub, server):
    before = rejected(server, "NOT_FOUND")
    error = error_of(lambda: generate(stub, model="llama-70b", prompt="Hi"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'llama-70b' is not served here" in error.details()
    assert rejected(server, "NOT_FOUND") == before + 1


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (Overloaded("the queue is full (64 waiting)"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("no healthy decode instance after 3 tries"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_backend_errors_map_to_their_status(stub, server, backend, exc, code):
    backend.error = exc
    before = rejected(server, code.name)
    error = error_of(lambda: generate(stub, prompt="Hi"))
    assert error.code() == code and error.details() == str(exc)
    assert rejected(server, code.name) == before + 1


def test_an_unexpected_error_is_internal_without_its_internals(stub, backend):
    backend.error = RuntimeError("secret path /srv/weights")
    error = error_of(lambda: generate(stub, prompt="Hi"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError" in error.details() and "secret" not in error.details()


def test_the_message_size_limit_is_configurable(loop, backend):
    server = start_server(loop, backend, max_message_bytes=1024)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb2_grpc.PDServeStub(channel)
            error = error_of(lambda: generate(stub, prompt="x" * 2000))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert split(generate(stub, prompt="Hi"))[1].finish_reason == "stop"  # small ones pass
    finally:
        loop.run(server.stop(grace=0))


# --- health and reflection -----------------------------------------------------------------------


def health_of(channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_health_follows_set_serving(loop, server, channel):
    assert health_of(channel, "") == health_of(channel, "pdserve.v1.PDServe") == Status.SERVING
    try:
        server.set_serving(False)  # from another thread than the server's loop
        assert health_of(channel, "") == health_of(channel, "pdserve.v1.PDServe") == Status.NOT_SERVING
    finally:

        async def from_the_loop() -> None:
            server.set_serving(True)

        loop.run(from_the_loop())
    assert health_of(channel, "") == health_of(channel, "pdserve.v1.PDServe") == Status.SERVING


def test_set_serving_before_start_applies_when_it_starts(loop, backend):
    server = GrpcServer(backend, Metrics(), port=0)
    server.set_serving(False)
    loop.run(server.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert health_of(channel, "pdserve.v1.PDServe") == Status.NOT_SERVING
    finally:
        loop.run(server.stop(grace=0))


def test_a_port_in_use_is_an_os_error(loop, server, backend):
    taken = GrpcServer(backend, Metrics(), port=server.port)
    with pytest.raises(OSError, match=f"127.0.0.1:{server.port}"):
        loop.run(taken.start())


def test_reflection_lists_and_describes_the_services(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {
        "pdserve.v1.PDServe",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    service = DescriptorPool(database).FindServiceByName("pdserve.v1.PDServe")
    assert set(service.methods_by_name) == {"Generate", "ListModels"}


# --- auth ----------------------------------------------------------------------------------------


def test_auth_refuses_a_missing_or_wrong_token(auth_server, auth_channel, backend):
    stub = pb2_grpc.PDServeStub(auth_channel)
    missing = error_of(lambda: generate(stub, prompt="Hi"))
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in missing.details()
    wrong = error_of(lambda: generate(stub, [("authorization", "Bearer guess")], prompt="Hi"))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and "wrong auth token" in wrong.details()
    no_models = error_of(lambda: stub.ListModels(pb2.ListModelsRequest(), timeout=10))
    assert no_models.code() == grpc.StatusCode.UNAUTHENTICATED
    assert backend.started == []
    assert rejected(auth_server, "UNAUTHENTICATED") == 3


def test_auth_accepts_the_right_token(auth_channel):
    stub = pb2_grpc.PDServeStub(auth_channel)
    metadata = [("authorization", f"Bearer {TOKEN}")]
    assert split(generate(stub, metadata, prompt="Hi"))[1].finish_reason == "stop"
    assert stub.ListModels(pb2.ListModelsRequest(), timeout=10, metadata=metadata).models[0].id == MODEL_ID


def test_health_and_reflection_stay_open_without_the_token(auth_channel):
    assert health_of(auth_channel, "pdserve.v1.PDServe") == Status.SERVING
    assert "pdserve.v1.PDServe" in ProtoReflectionDescriptorDatabase(auth_channel).get_services()


# --- cancellation and shutdown -------------------------------------------------------------------


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_cancelled_call_aborts_the_request_in_the_backend(stub, backend):
    backend.delay = 0.2
    call = stub.Generate(pb2.GenerateRequest(prompt="Hi", request_id="to-cancel"), timeout=10)
    assert next(call).WhichOneof("kind") == "delta"
    call.cancel()
    assert wait_for(lambda: backend.cancelled == ["to-cancel"]), backend.cancelled
    assert backend.finished == []


def test_stop_cancels_the_streams_still_running_after_the_grace_period(loop, backend):
    server = start_server(loop, backend)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        backend.delay = 0.3
        call = pb2_grpc.PDServeStub(channel).Generate(
            pb2.GenerateRequest(prompt="Hi", request_id="at-shutdown"), timeout=10
        )
        assert next(call).WhichOneof("kind") == "delta"
        loop.run(server.stop(grace=0.1))
        error = error_of(lambda: list(call))
        assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert wait_for(lambda: backend.cancelled == ["at-shutdown"]), backend.cancelled
    assert backend.finished == []
