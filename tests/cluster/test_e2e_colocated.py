"""The colocated baseline end to end on local Ray: `ClusterServer` with two colocated replicas
(`colocated.instances: 2`) behind the same router and front ends as the disaggregated cluster.
Greedy tokens equal the offline engine's, concurrent streams spread over both replicas, and a
replica killed mid-stream loses no request and no KV block."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import ray
from test_e2e import AUTH, PROMPTS, assert_replayed_or_unavailable, grpc_generate, pb, pb_grpc, wait_idle

from cluster.config import config_from_dict
from cluster.serve import ClusterServer
from engine.sampling_params import SamplingParams

TOKEN = AUTH[0][1].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def replicas():
    config = config_from_dict(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
            "prefill": {"max_num_batched_tokens": 256, "chunk_size": 64},
            "decode": {"max_batch": 16, "kv_cache_memory": "64MiB"},
            "colocated": {"instances": 2, "cpus": 0.5},
            "server": {"grpc_port": 0, "http_port": 0, "auth_token": TOKEN, "max_tokens_limit": 512},
        }
    )
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
def stub(replicas):
    channel = grpc.insecure_channel(replicas.endpoints["grpc"])
    yield pb_grpc.PDServeStub(channel)
    channel.close()


def test_replicas_give_the_offline_engines_greedy_tokens_side_by_side(replicas, stub, embedded_llm):
    assert {i.role for i in replicas.controller.instances.values()} == {"colocated"}
    assert replicas.controller.is_healthy()
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [f"{p} ({i})" for i, p in enumerate(PROMPTS * 2)]
    expected = embedded_llm.generate(prompts, params, use_tqdm=False)
    results: dict[int, tuple] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, grpc_generate(stub, prompts[i], 24)))
        for i in range(len(prompts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, want in enumerate(expected):
        ids, text, final = results[i]
        assert ids == want.token_ids and text == want.text and final.finish_reason == "length"
        assert final.timings.ttft > 0 and final.timings.tpot > 0
    used = wait_idle(replicas)
    assert set(used) == {"colocated-0", "colocated-1"} and not any(used.values())


def test_killing_a_replica_mid_stream_loses_no_request(replicas, stub, embedded_llm):
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
    victim = replicas.controller.instances["colocated-0"]
    ray.kill(victim.handle, no_restart=False)  # Ray restarts it; its streams replay on colocated-1
    assert_replayed_or_unavailable(threads, results, expected)
    assert replicas.metrics.retries._value.get() >= 1
    deadline = time.monotonic() + 120
    while not victim.healthy and time.monotonic() < deadline:
        time.sleep(0.5)
    assert victim.healthy
    assert not any(wait_idle(replicas).values())
