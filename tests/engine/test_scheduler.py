"""Scheduler decisions: the decodes' blocks taken in one allocation match growing them one by one,
and a step's chunks come out decodes first."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence


class OneByOne(Scheduler):
    """The general path only: every decode grows on its own, preempting when blocks run out."""

    def _grow_all(self, seqs: list[Sequence], needed: int) -> bool:
        return False


def adopted(sched: Scheduler, request_id: str, prompt_len: int, max_tokens: int) -> Sequence | None:
    """A decode-role arrival: the prompt's KV in blocks of `sched`, its first token sampled."""
    need = -(-prompt_len // sched.block_size)
    if not sched.allocator.can_allocate(need):
        return None
    seq = Sequence(request_id, [1] * prompt_len + [0], prompt_len, SamplingParams(max_tokens=max_tokens), 0.0)
    seq.num_computed_tokens = prompt_len
    seq.block_table = sched.allocator.allocate(need)
    sched.adopt(seq)
    return seq


def step(sched: Scheduler) -> tuple:
    """One engine step with a dummy sampled token; what was scheduled, and every block table."""
    out = sched.schedule()
    for seq in out.out_of_memory:
        sched.finish(seq, "length")
    for chunk in out.chunks:
        seq, samples = chunk.seq, chunk.samples
        seq.num_computed_tokens += chunk.num_tokens
        if samples:
            seq.token_ids.append(0)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
    scheduled = [(c.seq.request_id, c.num_tokens) for c in out.chunks]
    tables = {s.request_id: list(s.block_table) for s in [*sched.running, *sched.waiting]}
    return scheduled, [s.request_id for s in out.out_of_memory], tables, list(sched.allocator._free)


@settings(max_examples=300, deadline=None)
@given(
    num_blocks=st.integers(2, 24),
    block_size=st.sampled_from([1, 2, 4]),
    operations=st.lists(
        st.tuples(
            st.sampled_from(["adopt", "add", "step", "step", "step"]), st.integers(1, 30), st.integers(1, 12)
        ),
        min_size=10,
        max_size=80,
    ),
)
def test_decodes_grown_at_once_match_growing_one_by_one(num_blocks, block_size, operations):
    config = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=24, max_prefill_chunk=8)
    fast, general = Scheduler(config, num_blocks, block_size), OneByOne(config, num_blocks, block_size)
    for i, (op, length, max_tokens) in enumerate(operations):
        if op == "adopt":
            for sched in (fast, general):
                adopted(sched, str(i), min(length, num_blocks * block_size - 1), max_tokens)
        elif op == "add":
            length = min(length, num_blocks * block_size - 1)
            for sched in (fast, general):
                sched.add(Sequence(str(i), [1] * length, length, SamplingParams(max_tokens=max_tokens), 0.0))
        else:
            assert step(fast) == step(general)
        assert fast.num_preemptions == general.num_preemptions


def test_decode_blocks_go_to_sequences_in_running_order():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8), num_blocks=8, block_size=2)
    a, b, c = (adopted(sched, name, 2, 4) for name in "abc")  # blocks 0, 1, 2; each block is full
    out = sched.schedule()
    assert out.decodes == [a, b, c] and not out.prefills
    assert [s.block_table for s in (a, b, c)] == [[0, 3], [1, 4], [2, 5]]
    assert [(ch.seq, ch.num_tokens) for ch in out.chunks] == [(a, 1), (b, 1), (c, 1)]


def test_a_step_lists_decodes_before_prefill_chunks():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8), num_blocks=16, block_size=4)
    decoding = adopted(sched, "d", 5, 4)
    prompt = Sequence("p", [1] * 6, 6, SamplingParams(max_tokens=2), 0.0)
    sched.add(prompt)
    out = sched.schedule()
    assert out.decodes == [decoding] and [(ch.seq, ch.num_tokens) for ch in out.prefills] == [(prompt, 6)]
    assert [(ch.seq, ch.num_tokens) for ch in out.chunks] == [(decoding, 1), (prompt, 6)]
