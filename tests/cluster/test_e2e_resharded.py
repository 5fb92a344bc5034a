"""Disaggregated pools laid out differently, end to end on local Ray, in both directions: a
tensor-parallel prefill instance (tp=2) feeding two pipeline-parallel decode instances (pp=2
each), and a two-stage prefill feeding tensor-parallel decode instances. Each instance is two Ray
actors (rank 0 and its other rank) in the bundles of one placement group. Every prefill rank
sends the layers and KV heads it holds straight to the decode ranks that own them (over shared
memory, each decode rank serving its own endpoint). Greedy tokens equal the single-process
offline engine's, and a decode rank killed mid-stream fails its instance as a whole: the streams
replay on the other decode instance and no block stays held."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
import ray
from test_e2e import AUTH, PROMPTS, grpc_generate, kill_mid_stream, pb_grpc, serving, wait_idle
from test_e2e_parallel import rank_pids

from cluster.config import config_from_dict
from engine.sampling_params import SamplingParams

TOKEN = AUTH[0][1].removeprefix("Bearer ")


LAYOUTS = {  # (prefill pool, decode pool): both directions of a layout change
    "prefill tp=2, decode pp=2": ({"tp": 2}, {"pp": 2}),
    "prefill pp=2, decode tp=2": ({"pp": 2}, {"tp": 2}),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def resharded(request):
    prefill_pool, decode_pool = LAYOUTS[request.param]
    config = config_from_dict(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
            "prefill": {"max_num_batched_tokens": 256, "chunk_size": 64, "cpus": 0.5, **prefill_pool},
            "decode": {
                "instances": 2,
                "max_batch": 16,
                "kv_cache_memory": "64MiB",
                "cpus": 0.5,
                **decode_pool,
            },
            "server": {"grpc_port": 0, "http_port": 0, "auth_token": TOKEN, "max_tokens_limit": 512},
        }
    )
    yield from serving(config)


@pytest.fixture(scope="module")
def stub(resharded):
    channel = grpc.insecure_channel(resharded.endpoints["grpc"])
    yield pb_grpc.PDServeStub(channel)
    channel.close()


def _rank_kind(instance) -> str:
    """What runs the instance's second rank: a Ray actor in its own bundle of the placement group."""

    def kind(actor) -> str:
        return type(actor.worker.engine.ranks.processes[0]).__name__

    return ray.get(instance.handle.__ray_call__.remote(kind))


def test_resharded_pools_give_the_offline_engines_greedy_tokens(resharded, stub, embedded_llm):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = embedded_llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        ids, text, final = grpc_generate(stub, prompt, 16)
        assert ids == want.token_ids and text == want.text and final.finish_reason == "length"
    for instance in resharded.controller.instances.values():
        assert len(rank_pids(instance)) == 1 and _rank_kind(instance) == "RayRankHandle"
        assert len(instance.info.nodes) == 2  # every rank's node: shm only when all share one
        if instance.role == "decode":
            for _, addresses in instance.info.endpoints:
                assert len(set(addresses)) == 2  # each stage serves its own KV endpoint
    assert not any(wait_idle(resharded).values())


def test_a_dead_decode_rank_fails_its_instance_and_the_streams_replay(resharded, stub, embedded_llm):
    killed: list[int] = []

    def kill_a_stage(instance) -> None:
        (pid,) = rank_pids(instance)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    kill_mid_stream(resharded, stub, embedded_llm, "decode-0", kill=kill_a_stage)
    assert rank_pids(resharded.controller.instances["decode-0"]) != killed  # a new second rank
    assert not any(wait_idle(resharded).values())
