"""The OpenAI-compatible HTTP front end against a scripted backend: the official `openai` client and
raw HTTP (http.client) talk to a real HttpServer on a free port, run on its own event loop in a thread."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from scripted_backend import MODEL_ID, ScriptedBackend  # tests/cluster is on sys.path (no __init__.py)

from cluster.http_server import HttpServer, build_app
from cluster.metrics import Metrics
from cluster.openai_protocol import token_namer
from cluster.protocol import Delta, Final, Overloaded, Timings, Unavailable

REPLY = " Paris is the capital."
TOKEN = "s3cret-token"


class ServerThread:
    """An HttpServer on port 0, served by an event loop in a daemon thread. With cancel_handlers=False
    the app runs on a plain aiohttp runner instead, which notices a gone client only when a write fails."""

    def __init__(
        self, backend: ScriptedBackend, auth_token: str | None = None, cancel_handlers: bool = True
    ) -> None:
        self.metrics = Metrics()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        if cancel_handlers:
            server = HttpServer(backend, self.metrics, port=0, auth_token=auth_token)
            self._call(server.start())
            self.port, self._stop = server.port, server.stop
        else:
            runner = web.AppRunner(build_app(backend, self.metrics, auth_token), shutdown_timeout=1)
            self._call(_serve_on_free_port(runner))
            self.port, self._stop = runner.addresses[0][1], runner.cleanup
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def close(self) -> None:
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def rejected(self, code: str) -> float:
        text = request(self, "GET", "/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "pdserve_rejected_requests_total" and sample.labels["code"] == code:
                    return sample.value
        return 0.0


async def _serve_on_free_port(runner: web.AppRunner) -> None:
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()


@pytest.fixture(scope="module")
def backend() -> ScriptedBackend:
    return ScriptedBackend(REPLY, max_tokens_limit=256)


@pytest.fixture(autouse=True)
def fresh_backend(backend: ScriptedBackend) -> None:
    backend.error, backend.delay, backend.healthy = None, 0.0, True
    for record in (backend.started, backend.cancelled, backend.finished):
        record.clear()


@pytest.fixture(scope="module")
def server(backend: ScriptedBackend) -> Iterator[ServerThread]:
    s = ServerThread(backend)
    yield s
    s.close()


@pytest.fixture(scope="module")
def auth_server(backend: ScriptedBackend) -> Iterator[ServerThread]:
    s = ServerThread(backend, auth_token=TOKEN)
    yield s
    s.close()


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


# Raw HTTP through the standard library (the openai client hides statuses, headers and SSE framing).


@dataclass
class Reply:
    status: int
    content_type: str
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def request(
    server: ServerThread, method: str, path: str, body: Any = None, headers: dict | None = None, timeout=10.0
) -> Reply:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return Reply(response.status, response.getheader("Content-Type", ""), response.read().decode())
    finally:
        conn.close()


def post(server: ServerThread, path: str, body: Any, **kwargs: Any) -> Reply:
    return request(server, "POST", path, body, **kwargs)


@contextmanager
def stream(server: ServerThread, path: str, body: dict) -> Iterator[http.client.HTTPResponse]:
    """The open response to a streaming POST; leaving the block closes the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(
            "POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        yield conn.getresponse()
    finally:
        conn.close()


def sse_events(response: http.client.HTTPResponse) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream, as they arrive."""
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


# ---- completions ----


def test_completion_returns_the_reply_and_forwards_sampling_fields(client, backend):
    prompt = "The capital of France is"
    out = client.completions.create(
        model=MODEL_ID,
        prompt=prompt,
        max_tokens=20,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["xyz"],
        user="someone",
        extra_body={"top_k": 5, "stop_token_ids": [2], "ignore_eos": True, "min_tokens": 1},
    )
    assert out.choices[0].text == REPLY
    assert out.choices[0].finish_reason == "stop"
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL_ID
    prompt_ids = backend.tokenizer.encode(prompt)
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(backend.reply_ids)
    assert out.usage.total_tokens == len(prompt_ids) + len(backend.reply_ids)
    request_id, sent_ids, params = backend.started[-1]
    assert sent_ids == prompt_ids and len(request_id) == 32
    assert backend.finished == [request_id] and backend.cancelled == []  # ran to its end, not aborted
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (20, 0.5, 0.9, 7)
    assert (params.stop, params.top_k, params.stop_token_ids) == (("xyz",), 5, (2,))
    assert params.ignore_eos is True and params.min_tokens == 1 and params.logprobs is None


def test_completion_defaults_and_token_id_prompt(client, backend):
    ids = backend.tokenizer.encode("Hello")
    out = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=2)
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text == backend.tokenizer.decode(backend.reply_ids[:2])
    assert backend.started[-1][1] == ids
    client.completions.create(model=MODEL_ID, prompt=["Hello"])  # a one-prompt batch is fine
    assert backend.started[-1][2].max_tokens == 16  # OpenAI's default
    assert backend.started[-1][1] == ids
    assert backend.started[0][0] != backend.started[1][0]  # every request gets its own id


def test_completion_stream_with_usage(client, backend):
    chunks = list(
        client.completions.create(
            model=MODEL_ID, prompt="Hi", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(backend.reply_ids)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_completion_logprobs(client, backend):
    out = client.completions.create(model=MODEL_ID, prompt="Hi", logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == REPLY
    assert lp.token_logprobs == [-0.5] * len(backend.reply_ids)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert backend.started[-1][2].logprobs == 2


def test_logprob_tokens_without_a_tokenizer_are_token_ids(backend):
    assert token_namer(object())(42) == "token_id:42"
    assert token_namer(backend)(backend.reply_ids[0]) == " Paris"


# ---- chat ----


def test_chat_returns_the_reply_on_the_templated_prompt(client, backend):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=MODEL_ID, messages=messages, max_completion_tokens=30)
    assert out.choices[0].message.content == REPLY and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop"
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    templated = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert backend.started[-1][1] == backend.tokenizer.encode(templated, add_special_tokens=False)
    assert backend.started[-1][2].max_tokens == 30


def test_chat_content_parts_are_joined(client, backend):
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "France?"}]
    client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": parts}])
    text = backend.tokenizer.apply_chat_template([{"role": "user", "content": "What is France?"}])
    assert backend.started[-1][1] == backend.tokenizer.encode(text, add_special_tokens=False)


def test_chat_stream_order(client, backend):
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(backend.reply_ids)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert backend.finished == [backend.started[-1][0]] and backend.cancelled == []


def test_chat_stream_raw_ends_with_done(server):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with stream(server, "/v1/chat/completions", body) as response:
        assert response.getheader("Content-Type").startswith("text/event-stream")
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in json.loads(events[1])  # only with stream_options.include_usage


def test_chat_logprobs(client, backend):
    out = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == REPLY
    assert all(len(t.top_logprobs) == 3 and t.logprob == -0.5 for t in content)
    assert content[0].bytes == list(content[0].token.encode())
    assert backend.started[-1][2].logprobs == 3


# ---- models, health, metrics ----


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    assert models[0].object == "model"


def test_health_follows_the_backend(server, backend):
    assert request(server, "GET", "/health").status == 200
    backend.healthy = False
    assert request(server, "GET", "/health").status == 503


def test_metrics_exposition_parses_and_counts_rejections(server):
    before = server.rejected("INVALID_ARGUMENT")
    post(server, "/v1/completions", {"model": MODEL_ID, "prompt": ""})
    response = request(server, "GET", "/metrics")
    assert response.content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(response.text)}
    assert {"pdserve_time_to_first_token_seconds", "pdserve_rejected_requests"} <= names
    assert server.rejected("INVALID_ARGUMENT") == before + 1


# ---- bad requests ----

_CHAT = "/v1/chat/completions"
_BAD_REQUESTS = [
    # (path, body, status, words the message must hold)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": ""}, 400, "empty"),
    ("/v1/completions", {"model": MODEL_ID}, 400, "prompt is required"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": [5] * 2048}, 400, "context holds 2048"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": [1, 99999999]}, 400, "vocabulary"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": "9"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 1000}, 400, "limit of 256"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "n": 2}, 400, "n must be 1"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "'gpt-4' is not served"),
    (_CHAT, {"model": MODEL_ID}, 400, "messages"),
    (_CHAT, {"model": MODEL_ID, "messages": [{"role": "user"}]}, 400, "'content'"),
    (
        _CHAT,
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "logprobs: true",
    ),
    (_CHAT, {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400, "tools"),
    ("/v1/nowhere", {}, 404, "Not Found"),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), _BAD_REQUESTS)
def test_bad_request_gets_status_and_message(server, backend, path, body, status, words):
    response = post(server, path, body)
    assert response.status == status, response.text
    error = response.json()["error"]
    assert words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == ("NOT_FOUND" if status == 404 else "INVALID_ARGUMENT")
    assert backend.started == []  # refused before reaching the cluster


def test_unsupported_field_is_named_in_param(server):
    body = {"model": MODEL_ID, "prompt": "x", "echo": True}
    assert post(server, "/v1/completions", body).json()["error"]["param"] == "echo"


def test_overloaded_is_429(client, server, backend):
    before = server.rejected("RESOURCE_EXHAUSTED")
    backend.error = Overloaded("the queue is full")
    with pytest.raises(openai.RateLimitError, match="the queue is full") as caught:
        client.completions.create(model=MODEL_ID, prompt="Hi")
    assert caught.value.status_code == 429
    assert server.rejected("RESOURCE_EXHAUSTED") == before + 1


@pytest.mark.parametrize("stream", [False, True])
def test_unavailable_is_503_even_for_a_stream(server, backend, stream):
    backend.error = Unavailable("no healthy decode instance")
    body = {"model": MODEL_ID, "prompt": "Hi", "stream": stream}
    response = post(server, "/v1/completions", body)
    assert response.status == 503
    assert "no healthy decode instance" in response.json()["error"]["message"]


def _fail_after_one_token(backend: ScriptedBackend, *, raise_error: bool = False, reason: str = "error"):
    async def generate(request_id, prompt_ids, params):
        yield Delta((backend.reply_ids[0],), backend.tokenizer.decode(backend.reply_ids[:1]))
        if raise_error:
            raise Unavailable("the decode instance died")
        yield Final(request_id, reason, len(prompt_ids), 1, Timings(), error="CUDA fell over")

    return generate


def test_failed_generation_is_500_with_its_message(server, backend, monkeypatch):
    monkeypatch.setattr(backend, "generate", _fail_after_one_token(backend))
    response = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi"})
    assert response.status == 500
    assert response.json()["error"]["message"] == "CUDA fell over"


def test_aborted_generation_is_503(server, backend, monkeypatch):
    monkeypatch.setattr(backend, "generate", _fail_after_one_token(backend, reason="abort"))
    response = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi"})
    assert response.status == 503 and "aborted" in response.json()["error"]["message"]


@pytest.mark.parametrize(("raise_error", "message"), [(False, "CUDA fell over"), (True, "instance died")])
def test_error_mid_stream_is_an_error_event(server, backend, monkeypatch, raise_error, message):
    monkeypatch.setattr(backend, "generate", _fail_after_one_token(backend, raise_error=raise_error))
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with stream(server, "/v1/chat/completions", body) as response:
        assert response.status == 200  # the headers went out before the failure
        events = list(sse_events(response))
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == backend.tokenizer.decode(
        backend.reply_ids[:1]
    )
    assert message in json.loads(events[-2])["error"]["message"]
    assert events[-1] == "[DONE]"


# ---- auth ----


def test_auth_token_required_on_the_api(auth_server):
    body = {"model": MODEL_ID, "prompt": "Hi"}
    missing = post(auth_server, "/v1/completions", body)
    assert missing.status == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
    assert request(auth_server, "GET", "/v1/models").status == 401
    wrong = openai.OpenAI(base_url=f"{auth_server.url}/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="wrong"):
        wrong.completions.create(model=MODEL_ID, prompt="Hi")
    right = openai.OpenAI(base_url=f"{auth_server.url}/v1", api_key=TOKEN, max_retries=0)
    assert right.completions.create(model=MODEL_ID, prompt="Hi").choices[0].text == REPLY
    assert auth_server.rejected("UNAUTHENTICATED") == 3


def test_health_and_metrics_stay_open_with_auth(auth_server):
    assert request(auth_server, "GET", "/health").status == 200
    assert request(auth_server, "GET", "/metrics").status == 200


# ---- cancellation ----


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_stream_disconnect_aborts_the_request(server, backend):
    backend.delay = 0.2
    body = {"model": MODEL_ID, "prompt": "Hi", "stream": True}
    with stream(server, "/v1/completions", body) as response:
        assert json.loads(next(sse_events(response)))["choices"][0]["text"]  # then hang up
    request_id = backend.started[-1][0]
    assert _wait_for(lambda: request_id in backend.cancelled)
    assert request_id not in backend.finished


def test_failed_write_to_a_gone_client_aborts_the_request(backend):
    server = ServerThread(backend, cancel_handlers=False)  # only the failed write tells the client left
    try:
        backend.delay = 0.2
        with stream(
            server, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "stream": True}
        ) as response:
            next(sse_events(response))
        request_id = backend.started[-1][0]
        assert _wait_for(lambda: request_id in backend.cancelled)
        assert request_id not in backend.finished
    finally:
        server.close()


def test_client_timeout_aborts_a_plain_request(server, backend):
    backend.delay = 0.2
    with pytest.raises(TimeoutError):
        post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi"}, timeout=0.3)
    assert _wait_for(lambda: len(backend.cancelled) == 1)
    assert backend.cancelled == [backend.started[-1][0]] and backend.finished == []
