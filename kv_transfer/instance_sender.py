"""`InstanceSender`: the KV sending side of a whole prefill instance, as its worker sees it. Rank 0
(this process) sends the pieces its own cache holds; on a tensor- or pipeline-parallel instance
each other rank sends its own pieces from its own cache (kv_transfer/rank_kv.py), straight to the
decode ranks that own them. This class holds the request's blocks for all of them:

    prepare(request, destination)         (tensor parallel) every other rank learns where it goes
    start(request, blocks, destination)   rank 0's routes start
    send_layers(request, upto)            rank 0's layers as prefill stores them; with tensor
                                          parallelism every other rank sends its own from its
                                          forward at the same time (the step names the requests)
    finish(request)                       rank 0 sends the rest and waits for its acks; then every
                                          other rank does (all of its part, with pipeline stages);
                                          the first error is raised
    abort / expire                        every rank drops the transfer
    ── the blocks are freed once, when rank 0 is done and every other rank has answered ──

With pipeline stages the other ranks send once the prefill step that computed the KV has ended
(a step's micro-batches interleave on each stage, so a stored layer is not yet a whole request's).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.block_manager import BlockAllocator
from engine.parallel.rank_service import RankServices, first_failure
from kv_transfer.connections import ConnectionPool
from kv_transfer.errors import TransferError, as_transfer_error
from kv_transfer.rank_kv import routes_for
from kv_transfer.resharding import KVDestination, ShardLayout
from kv_transfer.sender import KVSender, SendState

REMOTE_GRACE_S = 5.0  # beyond the lease, for the other ranks' answers to arrive


@dataclass
class _Transfer:
    blocks: list[int]
    destination: KVDestination
    remote: list[Future] = field(default_factory=list)
    own_done: bool = False


class InstanceSender:
    def __init__(
        self,
        sender: KVSender,
        shard: ShardLayout,
        allocator: BlockAllocator,
        connect: Callable[[tuple[str, str]], object],
        services: RankServices | None = None,
    ) -> None:
        """`sender`: rank 0's, over its cache, owning no blocks (this class frees them).
        `services`: the other ranks' KV services when the instance has more than one rank."""
        if sender.allocator is not None:
            raise ValueError("the instance sender frees the blocks; give rank 0's KVSender no allocator")
        if (services is None) != (shard.num_ranks == 1):
            raise ValueError(
                f"a {shard.num_ranks}-rank instance needs the other ranks' services exactly when it has them"
            )
        self.sender = sender
        self.shard = shard
        self.allocator = allocator
        self.services = services
        self.pool = ConnectionPool(connect)
        self._transfers: dict[str, _Transfer] = {}
        self._lock = threading.Lock()

    @property
    def layerwise(self) -> bool:
        """Whether every rank sends layer by layer as prefill stores them: one pipeline stage."""
        return self.shard.pp == 1

    def prepare(self, request_id: str, destination: KVDestination) -> None:
        """Before the request runs: every other rank of a tensor-parallel instance learns its
        destination, so its forward can send its part layer by layer."""
        if self.services is None or not self.layerwise:
            return
        failure = first_failure(self.services.call_all("prepare", request_id, destination), REMOTE_GRACE_S)
        if failure is not None:
            raise as_transfer_error(failure)

    @property
    def num_held_blocks(self) -> int:
        with self._lock:
            return sum(len(t.blocks) for t in self._transfers.values())

    def state(self, request_id: str) -> SendState | None:
        with self._lock:
            if request_id in self._transfers:
                return SendState.SENDING
        return self.sender.state(request_id)

    def start(self, request_id: str, block_ids: list[int], destination: KVDestination) -> None:
        """Take over one reference to the request's blocks; on failure nothing is kept (the caller
        still holds its reference)."""
        with self._lock:
            if request_id in self._transfers:
                raise TransferError(f"a transfer of {request_id!r} is already in progress")
            try:
                self.sender.start(request_id, block_ids, routes_for(self.shard, 0, destination, self.pool))
            except BaseException:
                self._abort_remote(request_id, "the transfer could not start on rank 0")
                raise
            self._transfers[request_id] = _Transfer(list(block_ids), destination)

    def send_layers(self, request_id: str, upto: int) -> None:
        self.sender.send_layers(request_id, upto)

    def finish(self, request_id: str) -> None:
        """Every rank's pieces sent and acknowledged; raises the first error (blocks freed either way)."""
        with self._lock:
            t = self._transfers.get(request_id)
        if t is None:
            self.sender.finish(request_id)  # raises why it is not in progress
            return
        sends = {}
        if self.services is not None:  # the step that computed the KV has ended on every rank
            sends = self.services.call_all("send", request_id, t.blocks, t.destination)
            self._watch(request_id, sends)
        try:
            self.sender.finish(request_id)
        except BaseException:
            self._abort_remote(request_id, "rank 0's part of the transfer failed")
            raise
        finally:
            self._own_done(request_id)  # the blocks go once the other ranks have answered too
        failure = first_failure(sends, self.sender.lease_seconds + REMOTE_GRACE_S) if sends else None
        if failure is not None:
            raise as_transfer_error(failure)

    def abort(self, request_id: str, reason: str = "aborted by the prefill side") -> None:
        """Every rank drops the transfer; the blocks are freed once they all have. Unknown ids are ignored."""
        self.sender.abort(request_id, reason)
        self._abort_remote(request_id, reason)
        self._own_done(request_id)

    def expire(self) -> list[str]:
        """Rank 0's leases that ran out (the other ranks keep their own); returns their request ids."""
        expired = self.sender.expire()
        for request_id in expired:
            self._abort_remote(request_id, "the lease expired on rank 0")
            self._own_done(request_id)
        return expired

    def close(self) -> None:
        self.pool.close()

    # --- internals ------------------------------------------------------------------------------

    def _abort_remote(self, request_id: str, reason: str) -> None:
        """Every other rank drops the request (prepared, sending or waiting for acks); the blocks
        are freed only once they all have."""
        if self.services is None:
            return
        calls = self.services.call_all("abort", request_id, reason)
        if request_id in self._transfers:
            self._watch(request_id, calls)

    def _watch(self, request_id: str, calls: dict[int, Future]) -> None:
        with self._lock:
            t = self._transfers.get(request_id)
            if t is None:
                return
            t.remote.extend(calls.values())
        for future in calls.values():
            future.add_done_callback(lambda _, rid=request_id: self._release(rid))

    def _own_done(self, request_id: str) -> None:
        with self._lock:
            t = self._transfers.get(request_id)
            if t is not None:
                t.own_done = True
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        """Free the blocks once rank 0 is done with them and every other rank has answered."""
        with self._lock:
            t = self._transfers.get(request_id)
            if t is None or not t.own_done or not all(f.done() for f in t.remote):
                return
            del self._transfers[request_id]
        self.allocator.free(t.blocks)
