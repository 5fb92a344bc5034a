"""`InstanceReceiver`: the KV receiving side of a whole decode instance, as its worker sees it.
Rank 0 (this process) reserves the blocks, for every rank at once (block ids mean the same on all
ranks), and receives into its own cache; on a tensor- or pipeline-parallel instance each other
rank receives its own rectangle of the KV into its own cache (kv_transfer/rank_kv.py):

    reserve(request, n)   rank 0 allocates; every other rank adopts the same blocks, with a
                          deadline REMOTE_MARGIN earlier than rank 0's
    take(request)         every rank's part complete, or the request fails (blocks freed)
    abort / expire        every rank lets go before rank 0 frees the blocks

Only rank 0 frees. The other ranks' earlier deadline means that when rank 0's runs out and it
frees the blocks, no other rank still accepts frames into them.

It counts the prefill ranks each of its ranks hears from (`sources`): a decode rank's part is
complete when every prefill rank that holds a piece of it has ended.
"""

from __future__ import annotations

from concurrent.futures import Future

from engine.parallel.rank_service import RankServices, first_failure
from kv_transfer.errors import ReservationError, TransferError, as_transfer_error
from kv_transfer.receiver import KVReceiver, ReceiveState, TransferOutcome

CALL_TIMEOUT_S = 30.0  # for the other ranks to answer one call (they answer in milliseconds)
REMOTE_MARGIN_S = 1.0  # the other ranks' deadlines run out this much before rank 0's


class InstanceReceiver:
    def __init__(self, receiver: KVReceiver, sources: int, services: RankServices | None = None) -> None:
        """`receiver`: rank 0's, owning the blocks; `sources`: the prefill ranks rank 0 hears
        from; `services`: the other ranks' KV services when the instance has more than one rank."""
        self.receiver = receiver
        self.sources = sources
        self.services = services

    def reserve(self, request_id: str, num_tokens: int, timeout: float | None = None) -> list[int]:
        blocks = self.receiver.reserve(request_id, num_tokens, timeout, self.sources)
        if self.services is not None:
            left = (self.receiver.timeout if timeout is None else timeout) - REMOTE_MARGIN_S
            calls = self.services.call_all("reserve", request_id, num_tokens, blocks, max(left, 0.0))
            error = self._first_error(calls)
            if error is not None:
                self.abort(request_id, f"another rank could not reserve: {error}")
                raise ReservationError(
                    f"request {request_id!r}: another rank could not reserve its blocks: {error}"
                )
        return blocks

    def take(self, request_id: str) -> list[int]:
        """The blocks of a transfer complete on every rank, handed to the caller; otherwise every
        rank lets go, the blocks are freed and the error is raised."""
        status = self.receiver.status(request_id)
        if status is None or status.state is not ReceiveState.COMPLETE:
            try:
                return self.receiver.take(request_id)  # raises why not
            finally:
                self.abort(request_id, "taken before its KV was complete")
        if self.services is not None:
            error = self._first_error(self.services.call_all("take", request_id))
            if error is not None:
                self.receiver.abort(request_id, "another rank's part of the KV is not complete")
                raise error
        return self.receiver.take(request_id)

    def abort(self, request_id: str, reason: str = "aborted by the decode side") -> None:
        if self.services is not None:
            self._first_error(self.services.call_all("drop", request_id, reason))  # each has let go
        self.receiver.abort(request_id, reason)

    def expire(self) -> list[str]:
        late = self.receiver.expire()
        if self.services is not None:
            for request_id in late:  # they ran out first; make sure
                self.services.call_all("drop", request_id, "the deadline ran out on rank 0")
        return late

    def status(self, request_id: str) -> TransferOutcome | None:
        return self.receiver.status(request_id)

    @property
    def num_transfers(self) -> int:
        return self.receiver.num_transfers

    @property
    def num_reserved_blocks(self) -> int:
        return self.receiver.num_reserved_blocks

    def _first_error(self, calls: dict[int, Future]) -> TransferError | None:
        failure = first_failure(calls, CALL_TIMEOUT_S)
        return None if failure is None else as_transfer_error(failure)
