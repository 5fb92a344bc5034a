"""KV block bookkeeping: integers only, no tensors.

Invariants (checked by tests under random operation sequences):
  * a block is free  <=>  its reference count is 0, and it appears in the free list exactly once;
  * sum of reference counts == number of (sequence, block) ownerships handed out;
  * num_free_blocks + number of blocks with refcount > 0 == num_blocks.

Thread-safe: on a decode worker the scheduler allocates while KV-transfer threads free the blocks
of failed transfers.
"""

from __future__ import annotations

import threading
from collections import deque


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcounts = [0] * num_blocks
        self._lock = threading.Lock()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def refcount(self, block_id: int) -> int:
        return self._refcounts[block_id]

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            if n > len(self._free):
                raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
            take, refcounts = self._free.popleft, self._refcounts
            blocks = [take() for _ in range(n)]
            for b in blocks:
                refcounts[b] = 1
            return blocks

    def incref(self, block_ids: list[int]) -> None:
        """Share already-allocated blocks with one more owner (prefix reuse, forks)."""
        with self._lock:
            if any(self._refcounts[b] <= 0 for b in block_ids):
                free = [b for b in block_ids if self._refcounts[b] <= 0]
                raise ValueError(f"blocks {free} are free; only allocated blocks can be shared")
            for b in block_ids:
                self._refcounts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one ownership of each block; blocks nobody owns go back to the free list."""
        with self._lock:
            refcounts, free = self._refcounts, self._free
            for b in block_ids:
                count = refcounts[b]
                if count <= 0:
                    raise ValueError(f"double free of KV block {b}")
                refcounts[b] = count - 1
                if count == 1:
                    free.append(b)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
