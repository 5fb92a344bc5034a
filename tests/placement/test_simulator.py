"""The cluster simulator: queueing theory where it has an answer (M/D/1), the real Scheduler's
memory limit and the Router's back-pressure, and the decode fast path equal to stepping."""

from __future__ import annotations

import gc
import random
import statistics
from dataclasses import dataclass

import pytest

from engine.model_config import ModelConfig
from engine.presets import PRESETS
from engine.scheduler import SchedulerConfig
from placement.hardware import gpu_spec
from placement.latency import FixedLatency, Roofline
from placement.simulator import SLO, PoolSpec, SimCluster, Simulator, TransferSpec
from placement.workload import RequestSpec, poisson_requests, workload_preset

LLAMA = ModelConfig.from_hf(PRESETS["llama-3.1-8b"], name="llama-3.1-8b")
H100 = Roofline(LLAMA, gpu_spec("h100-80gb"))


def poisson(
    rate: float, n: int, input_len: int = 100, output_len: int = 1, seed: int = 0
) -> list[RequestSpec]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(RequestSpec(t, input_len, output_len))
    return out


@pytest.mark.parametrize("load", [0.3, 0.6])
def test_one_prefill_instance_reproduces_the_md1_mean_ttft(load):
    service = 0.1
    rate = load / service
    one_at_a_time = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=100, max_prefill_chunk=100)
    pool = PoolSpec(1, FixedLatency(service), one_at_a_time, num_blocks=64)
    cluster = SimCluster(prefill=pool, dispatch_delay=0.0, start_delay=0.0)
    result = Simulator(cluster).run(poisson(rate, 20000))
    simulated = statistics.mean(r.ttft for r in result.requests)
    md1 = service + rate * service**2 / (2 * (1 - rate * service))
    assert simulated == pytest.approx(md1, rel=0.05)


def pools(decode_blocks: int, block_size: int = 16) -> SimCluster:
    prefill_blocks = 20000 * 16 // block_size
    prefill = PoolSpec(1, H100, SchedulerConfig(256, 2048, 512), prefill_blocks, block_size)
    decode = PoolSpec(1, H100, SchedulerConfig(64, 256), decode_blocks, block_size)
    return SimCluster(prefill=prefill, decode=decode, transfer=TransferSpec(131072, 25e9, 1e-5, True, 32))


# Small blocks and a light load make fast-forwarded runs longer than a block (several new blocks
# per sequence in one event); the tight caches make them stop where blocks run out.
@pytest.mark.parametrize(
    "decode_blocks,block_size,rate", [(20000, 16, 30.0), (300, 16, 30.0), (4000, 1, 5.0), (1200, 4, 5.0)]
)
def test_the_decode_fast_path_gives_exactly_what_stepping_gives(decode_blocks, block_size, rate):
    requests = poisson_requests(workload_preset("chatbot"), rate, 300, seed=3, max_total_len=4096)
    stepped = Simulator(pools(decode_blocks, block_size), fast_forward=False).run(requests)
    fast = Simulator(pools(decode_blocks, block_size)).run(requests)
    assert [(r.first_token, r.last_token) for r in fast.requests] == [
        (r.first_token, r.last_token) for r in stepped.requests
    ]
    assert all(r.last_token >= r.first_token for r in fast.requests)


def test_a_small_decode_cache_preempts_and_queues_but_finishes_everything():
    requests = poisson_requests(workload_preset("chatbot"), 30.0, 300, seed=3, max_total_len=4096)
    roomy = Simulator(pools(20000)).run(requests)
    tight = Simulator(pools(300)).run(requests)  # 4,800 tokens of KV for up to 64 sequences
    assert not any(r.rejected for r in tight.requests)
    mean = lambda result, attr: statistics.mean(getattr(r, attr) for r in result.requests)  # noqa: E731
    assert mean(tight, "ttft") > 2 * mean(roomy, "ttft")  # requests waited for decode room


def test_past_the_queue_bound_requests_are_rejected_and_count_as_misses():
    requests = poisson(200.0, 400, input_len=1000, output_len=200)
    cluster = SimCluster(
        prefill=PoolSpec(1, H100, SchedulerConfig(256, 2048, 512), num_blocks=20000),
        decode=PoolSpec(1, H100, SchedulerConfig(8, 256), num_blocks=20000),
        max_queue=16,
    )
    result = Simulator(cluster).run(requests)
    rejected = sum(r.rejected for r in result.requests)
    assert rejected > 0
    assert result.attainment(SLO(100.0, 100.0)) == pytest.approx(1 - rejected / len(requests))


def test_a_slower_link_and_whole_prompt_transfer_delay_the_first_token():
    requests = poisson(2.0, 50, input_len=2000, output_len=2)
    prefill = PoolSpec(1, H100, SchedulerConfig(256, 2048, 2048), num_blocks=20000)
    decode = PoolSpec(1, H100, SchedulerConfig(64, 256), num_blocks=20000)

    def ttft(transfer: TransferSpec) -> float:
        cluster = SimCluster(prefill=prefill, decode=decode, transfer=transfer)
        return statistics.mean(r.ttft for r in Simulator(cluster).run(requests).requests)

    per_token = LLAMA.kv_bytes_per_token(2)
    fast = ttft(TransferSpec(per_token, 400e9, 5e-6, True, 32))
    slow = ttft(TransferSpec(per_token, 1e9, 5e-6, True, 32))
    slow_whole = ttft(TransferSpec(per_token, 1e9, 5e-6, False, 32))
    # 2,000 tokens x 128 KiB over 1 GB/s is about 0.26 s; layer-wise hides the part prefill overlaps.
    assert fast < slow < slow_whole
    assert slow_whole - fast == pytest.approx(2000 * per_token / 1e9, rel=0.05)


@pytest.mark.parametrize("stop_below", [False, True])
def test_a_run_leaves_no_reference_cycles_behind(stop_below):
    """The simulator turns the cyclic garbage collector off while it runs (its passes would walk
    every live sequence's tokens); that is only sound while a run frees all it made on return."""
    requests = poisson_requests(workload_preset("chatbot"), 200.0, 400, seed=1, max_total_len=4096)
    gc.collect()
    result = Simulator(pools(300)).run(requests, SLO(0.05, 0.02, 0.9), stop_below=stop_below)
    assert result.stopped_early == stop_below
    assert gc.collect() == 0
    assert gc.isenabled()


def test_early_stop_only_when_the_target_is_out_of_reach():
    requests = poisson_requests(workload_preset("chatbot"), 200.0, 400, seed=1, max_total_len=4096)
    slo = SLO(0.05, 0.02, 0.9)
    full = Simulator(pools(20000)).run(requests)
    early = Simulator(pools(20000)).run(requests, slo, stop_below=True)
    assert full.attainment(slo) < 0.9
    assert early.stopped_early and early.attainment(slo) == 0.0


@dataclass(frozen=True)
class Contending(FixedLatency):
    """Every step takes `factor` times as long while another instance steps (a CPU's shared
    memory bandwidth, as `pdserve profile` measures it)."""

    factor: float = 2.0

    def slowdown(self, phase: str, other: str) -> float:
        return self.factor


def test_steps_beside_a_busy_instance_take_the_latency_models_slowdown():
    def colocated(latency) -> SimCluster:
        pool = PoolSpec(2, latency, SchedulerConfig(8, 256, 256), num_blocks=1000)
        return SimCluster(colocated=pool, dispatch_delay=0.0, start_delay=0.0)

    two = [RequestSpec(0.0, 20, 11), RequestSpec(0.001, 20, 11)]  # one per replica, stepping together
    free = Simulator(colocated(FixedLatency(0.01))).run(two).requests
    shared = Simulator(colocated(Contending(0.01))).run(two).requests
    for alone, beside in zip(free, shared, strict=True):
        assert alone.tpot == pytest.approx(0.01)
        assert 1.7 * alone.tpot <= beside.tpot <= 2.0 * alone.tpot + 1e-9
    # a request with the other replica idle steps at full speed
    (lone,) = Simulator(colocated(Contending(0.01))).run([RequestSpec(0.0, 20, 11)]).requests
    assert (lone.ttft, lone.tpot) == (pytest.approx(0.01), pytest.approx(0.01))


def test_colocated_replicas_are_routed_by_the_router_on_their_reported_load():
    """The Router sees a replica's prompts still to prefill as its pending load and refuses one
    whose batch is full; a prefilled long prompt is one running request, not pending work."""
    pool = PoolSpec(2, FixedLatency(0.01), SchedulerConfig(2, 256, 256), num_blocks=1000)
    cluster = SimCluster(colocated=pool, dispatch_delay=0.0, start_delay=0.0)
    requests = [
        RequestSpec(0.0, 1000, 500),  # A: replica 0 (a tie, broken by name)
        RequestSpec(0.001, 20, 500),  # B: replica 1 (replica 0 has A's 1,000 tokens to prefill)
        RequestSpec(0.002, 20, 500),  # C: replica 1 (fewer tokens pending); its batch is now full
        RequestSpec(1.0, 20, 10),  # D: both prefilled everything; replica 0 runs one request
    ]
    a, b, c, d = Simulator(cluster).run(requests).requests
    assert d.ttft == pytest.approx(0.01)  # prefilled in replica 0's next step, beside A's decode
    assert max(b.ttft, c.ttft) < 0.05 and a.ttft == pytest.approx(0.04)  # A: four 256-token chunks
