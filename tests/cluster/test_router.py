"""The router's policy: least pending prefill tokens, most free decode blocks, load counted between
reports, back-pressure, unhealthy and removed instances skipped, any number of instances."""

from __future__ import annotations

import pytest

from cluster.router import DecodeLoad, Overloaded, PrefillLoad, Route, Router


def make_router(num_prefill: int = 2, num_decode: int = 2, free_blocks: int = 100, **kwargs) -> Router:
    router = Router(**kwargs)
    for i in range(num_prefill):
        router.report_prefill(f"p{i}", PrefillLoad())
    for i in range(num_decode):
        router.report_decode(f"d{i}", DecodeLoad(free_blocks=free_blocks))
    return router


def test_prefill_goes_to_least_pending_tokens_and_decode_to_most_free_blocks():
    router = make_router()
    router.report_prefill("p0", PrefillLoad(pending_tokens=5000, running=3))
    router.report_prefill("p1", PrefillLoad(pending_tokens=200, running=9))
    router.report_decode("d0", DecodeLoad(free_blocks=10))
    router.report_decode("d1", DecodeLoad(free_blocks=90))
    assert router.admit(100, 16) == Route("p1", "d1")


def test_a_burst_between_reports_spreads_over_the_instances():
    router = make_router(num_prefill=3, num_decode=3, free_blocks=100)
    routes = [router.admit(512, 16) for _ in range(6)]
    assert sorted(r.prefill for r in routes) == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert sorted(r.decode for r in routes) == ["d0", "d0", "d1", "d1", "d2", "d2"]
    assert router.prefill["p0"].pending_tokens == 1024
    assert router.decode["d0"].free_blocks == 100 - 2 * 33  # 513 tokens of KV = 33 blocks each


def test_decode_instances_without_room_are_skipped_and_then_back_pressure():
    router = make_router(free_blocks=4)  # 64 tokens each
    router.report_decode("d1", DecodeLoad(free_blocks=40))
    assert router.admit(100, 8).decode == "d1"  # d0 cannot hold 101 tokens
    with pytest.raises(Overloaded, match="no decode instance has room for 601 tokens"):
        router.admit(600, 8)


def test_waiting_queue_bound():
    router = make_router(max_waiting=2)
    router.admit(10, 1)
    router.admit(10, 1)
    with pytest.raises(Overloaded, match="2 requests are waiting"):
        router.admit(10, 1)
    router.leave_queue()
    router.admit(10, 1)


def test_unhealthy_and_removed_instances_get_nothing():
    router = make_router()
    router.report_prefill("p0", PrefillLoad(healthy=False))
    router.remove("d1")
    for _ in range(5):
        assert router.admit(10, 1) == Route("p1", "d0")
    router.remove("p1")
    with pytest.raises(Overloaded, match="no healthy prefill instance"):
        router.admit(10, 1)


def test_full_decode_batches_are_skipped():
    router = make_router(num_decode=1)
    router.report_decode("d0", DecodeLoad(free_blocks=100, running=64, max_batch=64))
    with pytest.raises(Overloaded, match="no decode instance has room"):
        router.admit(10, 1)


def test_many_instances_per_pool():
    router = make_router(num_prefill=8, num_decode=16, free_blocks=1000)
    routes = {router.admit(64, 8) for _ in range(64)}
    assert {r.prefill for r in routes} == {f"p{i}" for i in range(8)}
    assert {r.decode for r in routes} == {f"d{i}" for i in range(16)}


def test_colocated_replicas_serve_both_phases_least_pending_prompt_tokens_first():
    router = Router()
    router.report_colocated("c0", DecodeLoad(free_blocks=100, pending_tokens=900, running=1))
    router.report_colocated("c1", DecodeLoad(free_blocks=100, pending_tokens=0, running=5))
    router.report_colocated("c2", DecodeLoad(free_blocks=3, pending_tokens=0, running=0))  # 48 tokens
    assert router.admit(100, 16) == Route("c1", "c1")  # c2 cannot hold 101 tokens of KV
    assert router.colocated["c1"].pending_tokens == 100 and router.colocated["c1"].free_blocks == 93
    routes = [router.admit(500, 16).prefill for _ in range(3)]  # counted between reports
    assert routes == ["c1", "c1", "c0"]  # c1 reaches 1,100 pending tokens, past c0's 900
    router.remove("c1")
    router.remove("c0")
    with pytest.raises(Overloaded, match="no colocated instance has room for 101"):
        router.admit(100, 16)
    router.remove("c2")
    with pytest.raises(Overloaded, match="no healthy colocated instance"):
        router.admit(10, 16)
    router.report_colocated("c0", DecodeLoad(free_blocks=100))  # back after a restart
    assert router.admit(10, 16) == Route("c0", "c0")
