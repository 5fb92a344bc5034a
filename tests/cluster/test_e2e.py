"""The whole cluster, end to end, on a local Ray cluster with the embedded model: `ClusterServer`
(what `pdserve serve` runs) with one prefill and two decode actors, called through real gRPC and
the official `openai` client. Greedy text equals the offline engine's; concurrent streams finish;
cancelled streams and killed actors leave no KV block behind; bad and unauthenticated requests are
refused with the right status."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import grpc
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from cluster.cli import main as cli_main
from cluster.config import config_from_dict
from cluster.router import PrefillLoad
from cluster.serve import ClusterServer
from engine.sampling_params import SamplingParams
from kv_transfer import transports
from kv_transfer.errors import UnauthenticatedError
from kv_transfer.stubs import load as load_stubs
from placement.profiler import DecodeFit, PrefillFit, Profile

pb, pb_grpc = load_stubs("serving")
TOKEN = "e2e-secret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The history of the printing press", "Once upon a time, in a land far away,", "def fib(n):"]


@pytest.fixture(scope="module")
def cluster():
    config = config_from_dict(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
            "prefill": {"instances": 1, "cpus": 0.5, "kv_cache_memory": "64MiB", "chunk_size": 256},
            "decode": {"instances": 2, "cpus": 0.5, "max_batch": 16, "kv_cache_memory": "64MiB"},
            "kv_transfer": {"transport": "auto", "layerwise": True},
            "server": {"grpc_port": 0, "http_port": 0, "auth_token": TOKEN, "max_tokens_limit": 512},
        }
    )
    yield from serving(config)


def serving(config):
    """A ClusterServer started on its own event-loop thread, yielded, then drained and stopped."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = ClusterServer(config)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(600)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(drain_timeout=10), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def stub(cluster):
    channel = grpc.insecure_channel(cluster.endpoints["grpc"])
    yield pb_grpc.PDServeStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(
        base_url=cluster.endpoints["http"] + "/v1", api_key=TOKEN, max_retries=0, timeout=120
    )


def grpc_generate(stub, prompt: str, max_tokens: int, metadata=AUTH) -> tuple[list[int], str, object]:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids, text, final = [], "", None
    for response in stub.Generate(
        pb.GenerateRequest(prompt=prompt, sampling=sampling), metadata=metadata, timeout=300
    ):
        if response.HasField("delta"):
            ids += response.delta.token_ids
            text += response.delta.text
        else:
            final = response.final
    return ids, text, final


def blocks_used(cluster) -> dict[str, float]:
    body = urllib.request.urlopen(cluster.endpoints["http"] + "/metrics", timeout=30).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    return {s.labels["instance"]: s.value for s in families["pdserve_kv_blocks_used"].samples}


def wait_idle(cluster, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    used = blocks_used(cluster)
    while any(used.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
        used = blocks_used(cluster)
    return used


def test_grpc_gives_the_offline_engines_greedy_tokens(cluster, stub, embedded_llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = embedded_llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        ids, text, final = grpc_generate(stub, prompt, 24)
        assert ids == want.token_ids and text == want.text
        assert final.finish_reason == "length" and final.usage.completion_tokens == 24
        t = final.timings
        assert 0 < t.ttft <= t.e2e and t.tpot > 0
        assert 0 <= t.queued and 0 < t.prefill and t.queued + t.prefill + t.transfer <= t.ttft


def test_openai_client_gets_the_offline_chat_answer(client, embedded_llm):
    want = embedded_llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32))[0]
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=32, temperature=0
    )
    assert reply.choices[0].message.content == want.text == "The capital of France is Paris."
    stream = client.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=32, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
    completion = client.completions.create(
        model="smollm2-135m", prompt=PROMPTS[0], max_tokens=8, temperature=0
    )
    offline = embedded_llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert completion.choices[0].text == offline.text
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]


def test_sixteen_concurrent_streams_all_complete(cluster, stub, embedded_llm):
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(16)]
    expected = embedded_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    results: dict[int, tuple] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, grpc_generate(stub, prompts[i], 16)))
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(16))
    for i, (ids, _, final) in results.items():
        assert ids == expected[i].token_ids and final.finish_reason == "length"
    assert not any(wait_idle(cluster).values())


def test_a_cancelled_stream_frees_its_blocks_on_both_sides(cluster, stub):
    sampling = pb.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPTS[1] * 8, sampling=sampling), metadata=AUTH)
    received = [next(call) for _ in range(3)]
    assert all(r.HasField("delta") for r in received)
    assert any(blocks_used(cluster).values())  # it holds KV while it decodes
    call.cancel()
    assert not any(wait_idle(cluster).values())


def test_pdserve_bench_drives_the_cluster_and_writes_its_report(cluster, tmp_path):
    """`pdserve bench` against the running cluster: every request completes with exactly its
    output length, the report holds measurement and simulation side by side, nothing is held."""
    config = tmp_path / "bench.yaml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
                "slo": {"ttft_ms": 60000, "tpot_ms": 10000},
                "decode": {"instances": 2},
                "server": {"auth_token": TOKEN},
            }
        )
    )
    out = tmp_path / "out"
    argv = ["bench", "--config", str(config), "--target", cluster.endpoints["grpc"], "--workload", "code"]
    argv += ["--length-scale", "0.1", "--rates", "4", "--num-requests", "5", "--predict", "--no-plots"]
    assert cli_main([*argv, "--out", str(out)]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["summary"]["requests"] == 5 and run["summary"]["failed"] == 0
    assert run["summary"]["attainment"] == 1.0  # SLOs a minute long: every request meets them
    assert all(r["output_tokens"] == r["output_len"] and r["server"]["prefill"] > 0 for r in run["requests"])
    assert len(run["predicted"]) == 5 and "predicted_attainment" in run["summary"]
    assert "| 4 | 5 | 0 | 100.0% |" in (out / "summary.md").read_text()
    # --calibrate scales a profile by the first run's served/modelled ratios before predicting.
    profile = tmp_path / "profile.json"
    Profile(
        "smollm2-135m", "cpu", 1, 1, "float32", PrefillFit(0.01, 1e-4, 0.0), DecodeFit(0.01, 0.0, 1e-3)
    ).save(profile)
    argv += ["--calibrate", "--profile", str(profile)]
    assert cli_main([*argv, "--out", str(out)]) == 0
    calibration = json.loads((out / "results.json").read_text())["calibration"]
    assert calibration["rate"] == 4 and calibration["prefill"] > 0 and calibration["decode"] > 0
    assert "Predictions use the profile scaled" in (out / "summary.md").read_text()
    assert not any(wait_idle(cluster).values())


def test_health_follows_the_pools(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(cluster.endpoints["grpc"]) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        deadline = time.monotonic() + 10
        status = check(health_pb2.HealthCheckRequest(service="pdserve.v1.PDServe")).status
        while status != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.2)
            status = check(health_pb2.HealthCheckRequest(service="pdserve.v1.PDServe")).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    assert urllib.request.urlopen(cluster.endpoints["http"] + "/health", timeout=30).status == 200


def test_metrics_parse_and_count_requests(cluster, stub):
    grpc_generate(stub, PROMPTS[2], 4)
    body = urllib.request.urlopen(cluster.endpoints["http"] + "/metrics", timeout=30).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for name in (
        "pdserve_time_to_first_token_seconds",
        "pdserve_time_per_output_token_seconds",
        "pdserve_queue_time_seconds",
        "pdserve_kv_transfer_seconds",
        "pdserve_e2e_request_latency_seconds",
    ):
        count = next(s.value for s in families[name].samples if s.name == name + "_count")
        assert count >= 1, name
    assert {"pdserve_requests_running", "pdserve_requests_waiting", "pdserve_kv_blocks_used"} <= set(families)
    assert set(blocks_used(cluster)) == {"prefill-0", "decode-0", "decode-1"}


def test_bad_and_unauthenticated_requests_are_refused(cluster, stub, client):
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(stub, "", 4)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(stub, "hello", 4, metadata=())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="smollm2-135m", prompt="hi", max_tokens=4, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    request = urllib.request.Request(
        cluster.endpoints["http"] + "/v1/completions",
        data=b"{not json",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with pytest.raises(urllib.error.HTTPError) as http_info:
        urllib.request.urlopen(request, timeout=30)
    assert http_info.value.code == 400 and "JSON" in json.loads(http_info.value.read())["error"]["message"]
    no_token = openai.OpenAI(base_url=cluster.endpoints["http"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_token.models.list()


def test_the_kv_service_refuses_peers_without_the_secret(cluster):
    decode = next(i for i in cluster.controller.instances.values() if i.role == "decode")
    (address,) = dict(decode.info.endpoints)["grpc"]  # one rank
    with pytest.raises(UnauthenticatedError, match="token"):
        transports.connect("grpc", address, token="not-the-secret")


def assert_replayed_or_unavailable(threads, results: dict[int, object], expected) -> None:
    """Every request ended: a clean UNAVAILABLE, or (replayed on another instance) one continuous
    stream of exactly the offline engine's tokens; at least one of them the latter."""
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(len(expected)))
    for i, outcome in results.items():
        if isinstance(outcome, grpc.RpcError):
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE
        else:
            assert outcome == expected[i].token_ids
    assert sum(isinstance(o, list) for o in results.values()) >= 1


def test_killing_a_decode_actor_mid_stream_loses_no_request(cluster, stub, embedded_llm):
    kill_mid_stream(cluster, stub, embedded_llm, "decode-0")  # Ray restarts it; streams move to decode-1


def kill_mid_stream(server, stub, embedded_llm, victim_name: str, kill=None) -> None:
    """Four greedy streams; once each has its first token, kill `victim_name` (Ray restarts it;
    `kill(instance)` does the killing, by default `ray.kill` of its actor). Every stream ends
    replayed or UNAVAILABLE, some really were retried, the instance comes back and no KV block is
    left held."""
    prompts = [f"{PROMPTS[i % 3]} (take {i})" for i in range(4)]
    n = 48
    expected = embedded_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    results: dict[int, object] = {}
    started = threading.Barrier(len(prompts) + 1)

    def run(i: int) -> None:
        sampling = pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        call = stub.Generate(
            pb.GenerateRequest(prompt=prompts[i], sampling=sampling), metadata=AUTH, timeout=300
        )
        ids = list(next(call).delta.token_ids)
        started.wait()
        try:
            for response in call:
                ids += response.delta.token_ids if response.HasField("delta") else []
            results[i] = ids
        except grpc.RpcError as exc:  # a clean failure is allowed; a hang is not
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    started.wait(120)
    victim = server.controller.instances[victim_name]
    if kill is None:
        ray.kill(victim.handle, no_restart=False)
    else:
        kill(victim)
    assert_replayed_or_unavailable(threads, results, expected)
    assert server.metrics.retries._value.get() >= 1  # some streams really were on the killed actor
    deadline = time.monotonic() + 120
    while not victim.healthy and time.monotonic() < deadline:  # the pool recovers
        time.sleep(0.5)
    assert victim.healthy
    assert not any(wait_idle(server).values())


def test_past_the_queue_bound_requests_get_resource_exhausted_and_429(cluster, stub):
    controller = cluster.controller
    config = controller.config
    controller.config = replace(config, server=replace(config.server, max_queue=1))
    controller.router.max_waiting = 1
    try:
        outcomes: list[object] = []

        def run(i: int) -> None:
            try:
                outcomes.append(grpc_generate(stub, PROMPTS[i % 3] * 30, 2)[2].finish_reason)
            except grpc.RpcError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        assert refused and all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused)
        assert "waiting" in refused[0].details() and "length" in outcomes  # the others were served
        controller.router.waiting = 5  # as if five requests were queued ahead
        request = urllib.request.Request(
            cluster.endpoints["http"] + "/v1/completions",
            data=json.dumps({"model": "smollm2-135m", "prompt": "hi", "max_tokens": 2}).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as http_info:
            urllib.request.urlopen(request, timeout=30)
        assert http_info.value.code == 429
    finally:
        controller.router.waiting = 0
        controller.config = config
        controller.router.max_waiting = config.server.max_queue
    assert not any(wait_idle(cluster).values())


def test_killing_the_prefill_actor_mid_prefill_loses_no_request(cluster, stub, embedded_llm):
    prompts = [f"{PROMPTS[i % 3]} (long take {i}) " * 40 for i in range(3)]
    n = 8
    expected = embedded_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    victim = cluster.controller.instances["prefill-0"]
    retries = cluster.metrics.retries._value.get()
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = grpc_generate(stub, prompts[i], n)[0]
        except grpc.RpcError as exc:  # a clean failure is allowed; a hang is not
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while cluster.controller.router.prefill.get("prefill-0", PrefillLoad()).pending_tokens == 0:
        assert time.monotonic() < deadline, "the prompts never reached the prefill instance"
        time.sleep(0.01)
    ray.kill(victim.handle, no_restart=False)  # the only prefill instance: requests wait for it
    assert_replayed_or_unavailable(threads, results, expected)
    assert cluster.metrics.retries._value.get() > retries  # the kill hit requests in prefill
    assert victim.healthy
    assert not any(wait_idle(cluster).values())
