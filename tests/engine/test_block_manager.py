"""Block allocator and scheduler invariants under randomized operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockAllocator, blocks_needed
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence


def check_invariants(alloc: BlockAllocator, owners: dict[int, list[int]]) -> None:
    held: dict[int, int] = {}
    for blocks in owners.values():
        for b in blocks:
            held[b] = held.get(b, 0) + 1
    for b in range(alloc.num_blocks):
        assert alloc.refcount(b) == held.get(b, 0)
    free = list(alloc._free)
    assert len(free) == len(set(free)) == alloc.num_free_blocks
    assert set(free) == {b for b in range(alloc.num_blocks) if alloc.refcount(b) == 0}


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free", "share"]), st.integers(0, 9), st.integers(0, 6)), max_size=80
)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(1, 24), operations=ops)
def test_allocator_invariants(num_blocks, operations):
    alloc = BlockAllocator(num_blocks)
    owners: dict[int, list[int]] = {}
    next_owner = 0
    for op, who, n in operations:
        if op == "alloc":
            if alloc.can_allocate(n):
                owners[next_owner] = alloc.allocate(n)
                next_owner += 1
            else:
                with pytest.raises(MemoryError):
                    alloc.allocate(n)
        elif op == "share" and owners:
            src = owners[sorted(owners)[who % len(owners)]]
            alloc.incref(src)
            owners[next_owner] = list(src)
            next_owner += 1
        elif op == "free" and owners:
            alloc.free(owners.pop(sorted(owners)[who % len(owners)]))
        check_invariants(alloc, owners)
    for blocks in owners.values():
        alloc.free(blocks)
    assert alloc.num_free_blocks == num_blocks  # nothing leaked


def test_double_free_and_sharing_free_blocks_are_errors():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(blocks)
    with pytest.raises(ValueError, match="are free"):
        alloc.incref([3])


def test_blocks_needed():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(4, 16),
    budget=st.integers(4, 48),
    prompts=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=8),
    abort_at=st.lists(st.integers(0, 30), max_size=3),
    max_chunk=st.one_of(st.none(), st.integers(1, 16)),
)
def test_scheduler_finishes_everything_and_leaks_nothing(num_blocks, budget, prompts, abort_at, max_chunk):
    """Drive the scheduler as the engine does (sampling a dummy token) with aborts sprinkled in."""
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, max_prefill_chunk=max_chunk),
        num_blocks,
        block_size=4,
    )
    seqs = []
    for i, (plen, max_tokens) in enumerate(prompts):
        plen = min(plen, num_blocks * 4 - 1)
        seq = Sequence(str(i), list(range(plen)), plen, SamplingParams(max_tokens=max_tokens), 0.0)
        sched.add(seq)
        seqs.append(seq)
    for step in range(2000):
        if not sched.has_unfinished():
            break
        if step in abort_at:
            victim = next((s for s in seqs if not s.is_finished), None)
            if victim:
                sched.finish(victim, "abort")
        out = sched.schedule()
        assert sum(c.num_tokens for c in out.chunks) <= budget
        assert all(c.num_tokens <= (max_chunk or budget) for c in out.chunks)
        for seq in out.out_of_memory:
            sched.finish(seq, "length")
        for chunk in out.chunks:
            seq = chunk.seq
            assert len(seq.block_table) * 4 >= seq.num_computed_tokens + chunk.num_tokens
            samples = chunk.samples
            seq.num_computed_tokens += chunk.num_tokens
            if samples:
                seq.token_ids.append(0)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    sched.finish(seq, "length")
        held = [b for s in sched.running for b in s.block_table]
        assert len(held) == len(set(held))  # no block owned twice
        assert sched.allocator.num_free_blocks + len(held) == num_blocks
    assert not sched.has_unfinished()
    assert sched.allocator.num_free_blocks == num_blocks
    assert all(s.is_finished for s in seqs)
