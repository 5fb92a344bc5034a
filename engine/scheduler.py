"""Continuous batching under a token budget, SARATHI style: every step runs all decodes and fills
the rest of the budget with prefill chunks, so a long prompt never stalls running sequences.

The scheduler owns the waiting and running queues and the block allocator; it never touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockAllocator, blocks_needed
from engine.errors import InvalidConfigError
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 1024  # tokens computed per step (decodes + prefill chunks)
    max_prefill_chunk: int | None = None  # at most this many of one prompt's tokens per step

    def __post_init__(self) -> None:
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise InvalidConfigError(f"max_prefill_chunk must be >= 1, got {self.max_prefill_chunk}")
        if self.max_num_seqs < 1:
            raise InvalidConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode each step"
            )


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of `seq` computed this step, from seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # decodes (one token) first, then prefill chunks
    out_of_memory: list[Sequence]  # sequences that cannot grow even alone; the engine finishes them


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_blocks: int, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # since start, for metrics and tests

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.block_size

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for its first `num_tokens` tokens if memory allows."""
        extra = blocks_needed(num_tokens, self.block_size) - len(seq.block_table)
        if extra <= 0:
            return True
        if not self.allocator.can_allocate(extra):
            return False
        seq.block_table.extend(self.allocator.allocate(extra))
        return True

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop its KV, keep its tokens, put it first in line."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def hand_off(self, seq: Sequence) -> list[int]:
        """Prefill role: `seq` leaves this scheduler with its KV blocks, which now belong to the
        caller (the KV sender frees them once decode has them)."""
        self.running.remove(seq)
        blocks, seq.block_table = seq.block_table, []
        seq.status = SequenceStatus.FINISHED
        return blocks

    def adopt(self, seq: Sequence) -> None:
        """Decode role: `seq` arrives with its prompt's KV already in `seq.block_table` (blocks of
        this scheduler's allocator) and joins the running batch."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunk = self.config.max_prefill_chunk or budget
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        out_of_memory: list[Sequence] = []

        # Preemption below takes sequences out of `running` (status WAITING) while the loops walk
        # a snapshot of it: the status says whether a sequence is still in, without a list scan.
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens != 1:
                continue
            while not self._grow(seq, seq.num_tokens):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1 and not decodes:
                    out_of_memory.append(seq)  # the whole cache is not enough for it
                    break
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                decodes.append(ScheduledChunk(seq, 1))
                budget -= 1

        # Like a decode, an older prefill takes blocks from the newest sequences (not from one
        # scheduled this step); otherwise two half-prefilled prompts could each wait forever for
        # blocks the other holds.
        scheduled = {id(c.seq) for c in decodes}
        for seq in list(self.running):  # chunked prefills already admitted, oldest first
            n = min(seq.num_uncomputed_tokens, budget, chunk)
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens <= 1 or n <= 0:
                continue
            while not self._grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                if victim is seq or id(victim) in scheduled:
                    break
                self._preempt(victim)
            if seq.num_computed_tokens + n <= len(seq.block_table) * self.block_size:
                prefills.append(ScheduledChunk(seq, n))
                budget -= n

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget, chunk)
            if not self._grow(seq, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            prefills.append(ScheduledChunk(seq, n))
            budget -= n

        return SchedulerOutput(decodes + prefills, out_of_memory)
