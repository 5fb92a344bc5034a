"""The colocated baseline end to end on local Ray: `ClusterServer` with two colocated replicas
(`colocated.instances: 2`) behind the same router and front ends as the disaggregated cluster.
Greedy tokens equal the offline engine's, concurrent streams spread over both replicas, and a
replica killed mid-stream loses no request and no KV block."""

from __future__ import annotations

import threading

import grpc
import pytest
from test_e2e import AUTH, PROMPTS, grpc_generate, kill_mid_stream, pb_grpc, serving, wait_idle

from cluster.config import config_from_dict
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
    yield from serving(config)


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
    kill_mid_stream(replicas, stub, embedded_llm, "colocated-0")  # its streams replay on colocated-1
