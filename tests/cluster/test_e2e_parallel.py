"""Parallel instances end to end on local Ray: two colocated replicas, each an engine of two
pipeline stages (two processes: the actor and its second stage), behind the usual router and
front ends. Greedy tokens equal the single-process offline engine's, and a stage process killed
mid-stream fails its instance as a whole: Ray restarts it, its streams replay on the other
replica, and no KV block is left held."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
import ray
from test_e2e import AUTH, PROMPTS, grpc_generate, kill_mid_stream, pb_grpc, serving, wait_idle

from cluster.config import config_from_dict
from engine.sampling_params import SamplingParams

TOKEN = AUTH[0][1].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def staged():
    config = config_from_dict(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
            "prefill": {"max_num_batched_tokens": 256, "chunk_size": 64},
            "decode": {"max_batch": 16, "kv_cache_memory": "64MiB"},
            "colocated": {"instances": 2, "cpus": 0.5, "pp": 2},
            "server": {"grpc_port": 0, "http_port": 0, "auth_token": TOKEN, "max_tokens_limit": 512},
        }
    )
    yield from serving(config)


@pytest.fixture(scope="module")
def stub(staged):
    channel = grpc.insecure_channel(staged.endpoints["grpc"])
    yield pb_grpc.PDServeStub(channel)
    channel.close()


def rank_pids(instance) -> list[int]:
    """The pids of the instance engine's ranks beyond rank 0 (processes the actor spawned)."""

    def pids(actor) -> list[int]:
        return [p.pid for p in actor.worker.engine.ranks.processes]

    return ray.get(instance.handle.__ray_call__.remote(pids))


def test_pipelined_replicas_give_the_offline_engines_greedy_tokens(staged, stub, embedded_llm):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = embedded_llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        ids, text, final = grpc_generate(stub, prompt, 16)
        assert ids == want.token_ids and text == want.text and final.finish_reason == "length"
    for instance in staged.controller.instances.values():
        assert len(rank_pids(instance)) == 1  # two stages: the actor and one spawned process


def test_a_dead_stage_fails_its_instance_and_the_streams_replay_elsewhere(staged, stub, embedded_llm):
    killed: list[int] = []

    def kill_a_stage(instance) -> None:
        (pid,) = rank_pids(instance)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    kill_mid_stream(staged, stub, embedded_llm, "colocated-0", kill=kill_a_stage)
    victim = staged.controller.instances["colocated-0"]
    assert rank_pids(victim) != killed  # restarted as a whole: a new second stage
    assert not any(wait_idle(staged).values())
