"""The prefill side of a KV transfer: encode a request's blocks into frames, send them, and hold the
blocks under a lease until the decode side acknowledges.

    start(request, blocks, connection)        the sender now owns one reference to the blocks
      │ send_layers(request, upto)  ...       as prefill finishes layers (or send_all at once)
      ▼
    finish(request) ── ack ──────────────────► DONE     blocks freed
      │ ── receiver error / timeout ─────────► FAILED   blocks freed, the error raised
    abort(request) ──────────────────────────► ABORTED  receiver told, blocks freed
    expire() after lease_seconds ────────────► EXPIRED  receiver told, blocks freed

Whatever happens, the blocks are freed exactly once and the receiver is told when it should let
go; `num_held_blocks` returns to where it was. Thread-safe: the prefill loop sends while a
housekeeping thread may call expire(); a transfer waiting for its ack is never expired under it
(the wait itself is bounded by the lease).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from engine.block_manager import BlockAllocator
from kv_transfer import codecs
from kv_transfer.codecs import CodecSpec
from kv_transfer.errors import TransferAbortedError, TransferError, TransferTimeoutError, UnknownTransferError
from kv_transfer.frame import (
    FORMAT_VERSION,
    FrameHeader,
    StreamingChecksum,
    checksum_alg_for,
    payload_checksum,
    streams_checksum,
)
from kv_transfer.layout import KVLayout
from kv_transfer.transport import Connection, Frame

DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_MAX_FRAME_BYTES = 32 << 20
_MAX_OUTCOMES = 4096


class SendState(enum.Enum):
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"
    EXPIRED = "expired"


@dataclass
class OutgoingTransfer:
    request_id: str
    block_ids: list[int]
    connection: Connection
    expires_at: float
    block_tensor: torch.Tensor  # block_ids as int64 on the cache's device
    layers_sent: int = 0
    num_frames: int = 0
    state: SendState = SendState.SENDING
    ending: bool = False  # finish() is waiting for the ack


class KVSender:
    def __init__(
        self,
        cache: torch.Tensor,
        layout: KVLayout,
        allocator: BlockAllocator,
        codec: CodecSpec | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        codec = codec or CodecSpec()
        codecs.check_layout(codec, layout)
        self.cache = cache
        self.layout = layout
        self.allocator = allocator
        self.codec = codec
        self.lease_seconds = lease_seconds
        self.max_frame_bytes = max_frame_bytes
        self.clock = clock
        self._transfers: dict[str, OutgoingTransfer] = {}
        self._outcomes: OrderedDict[str, SendState] = OrderedDict()  # recent ended transfers, bounded
        self._lock = threading.RLock()

    @property
    def num_held_blocks(self) -> int:
        """Blocks held for transfers in flight (freed ones excluded)."""
        with self._lock:
            return sum(len(t.block_ids) for t in self._transfers.values())

    def state(self, request_id: str) -> SendState | None:
        with self._lock:
            t = self._transfers.get(request_id)
            return t.state if t is not None else self._outcomes.get(request_id)

    def start(self, request_id: str, block_ids: list[int], connection: Connection) -> None:
        """Take over one reference to `block_ids` (the request's blocks, in order) under a lease."""
        if not block_ids:
            raise TransferError(f"request {request_id!r} has no KV blocks to send")
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.cache.device)
        with self._lock:
            if request_id in self._transfers:
                raise TransferError(f"a transfer of {request_id!r} is already in progress")
            self._outcomes.pop(request_id, None)
            expires = self.clock() + self.lease_seconds
            self._transfers[request_id] = OutgoingTransfer(
                request_id, list(block_ids), connection, expires, ids
            )

    def send_layers(self, request_id: str, upto: int) -> None:
        """Send layers [layers already sent, upto): call as prefill finishes each layer."""
        with self._lock:
            t = self._active(request_id)
            if not t.layers_sent <= upto <= self.layout.num_layers:
                raise ValueError(
                    f"cannot send layers up to {upto}: "
                    f"{t.layers_sent} of {self.layout.num_layers} already sent"
                )
            try:
                for a, b, first, count in self._frame_plan(t.layers_sent, upto, len(t.block_ids)):
                    self._send_frame(t, a, b, first, count)
            except Exception as exc:  # noqa: BLE001 - any failure ends the transfer, blocks freed
                error = exc if isinstance(exc, TransferError) else TransferError(f"sending failed: {exc!r}")
                self._tell_abort(t, f"failed on the prefill side: {error}")
                self._close(t, SendState.FAILED)
                raise error from (None if error is exc else exc)
            t.layers_sent = upto

    def send_all(self, request_id: str) -> None:
        self.send_layers(request_id, self.layout.num_layers)

    def finish(self, request_id: str, timeout: float | None = None) -> None:
        """Send what is left, then wait for the acknowledgement (within the lease); frees the blocks
        either way and raises the receiver's TransferError, or TransferTimeoutError."""
        with self._lock:
            self.send_all(request_id)
            t = self._transfers[request_id]
            t.ending = True
            left = t.expires_at - self.clock()
        try:  # not under the lock: the wait may be long, and aborts/expiry of others go on
            t.connection.end(request_id, t.num_frames, left if timeout is None else min(timeout, left))
        except Exception as exc:  # noqa: BLE001 - any failure ends the transfer, blocks freed
            error = (
                exc
                if isinstance(exc, TransferError)
                else TransferError(f"waiting for the ack failed: {exc!r}")
            )
            with self._lock:
                self._tell_abort(t, f"failed on the prefill side: {error}")  # in case the receiver holds on
                self._close(t, SendState.FAILED)
            raise error from (None if error is exc else exc)
        with self._lock:
            if t.state is not SendState.SENDING:  # aborted by another thread while we waited
                raise TransferAbortedError(
                    f"the transfer of {request_id!r} was aborted while waiting for its ack"
                )
            self._close(t, SendState.DONE)

    def abort(self, request_id: str, reason: str = "aborted by the prefill side") -> None:
        """Tell the receiver to drop the transfer and free the blocks. Unknown ids are ignored."""
        with self._lock:
            t = self._transfers.get(request_id)
            if t is None:
                return
            self._tell_abort(t, reason)
            self._close(t, SendState.ABORTED)

    def expire(self) -> list[str]:
        """Abort every transfer whose lease ran out; returns their request ids."""
        with self._lock:
            now = self.clock()
            expired = [t for t in self._transfers.values() if now >= t.expires_at and not t.ending]
            for t in expired:
                self._tell_abort(t, f"lease of {self.lease_seconds:g} s expired on the prefill side")
                self._close(t, SendState.EXPIRED)
            return [t.request_id for t in expired]

    # --- internals ------------------------------------------------------------------------------

    def _active(self, request_id: str) -> OutgoingTransfer:
        t = self._transfers.get(request_id)
        if t is not None:
            return t
        outcome = self._outcomes.get(request_id)
        if outcome is None:
            raise UnknownTransferError(f"no transfer of {request_id!r} was started")
        if outcome is SendState.EXPIRED:
            raise TransferTimeoutError(f"the lease on {request_id!r}'s blocks expired; the KV is gone")
        if outcome in (SendState.DONE, SendState.FAILED):
            raise TransferError(f"the transfer of {request_id!r} already ended ({outcome.value})")
        raise TransferAbortedError(f"the transfer of {request_id!r} already ended ({outcome.value})")

    def _frame_plan(self, start: int, end: int, num_blocks: int) -> Iterator[tuple[int, int, int, int]]:
        """(layer_start, layer_end, first_block, num_blocks) per frame, each under max_frame_bytes."""
        per_layer = self.codec.raw_nbytes(self.layout, num_blocks, 1)
        if per_layer <= self.max_frame_bytes:
            step = max(1, self.max_frame_bytes // per_layer)
            for a in range(start, end, step):
                yield a, min(a + step, end), 0, num_blocks
            return
        per_block = max(1, self.max_frame_bytes // self.codec.raw_nbytes(self.layout, 1, 1))
        for layer in range(start, end):
            for first in range(0, num_blocks, per_block):
                yield layer, layer + 1, first, min(per_block, num_blocks - first)

    def _send_frame(self, t: OutgoingTransfer, a: int, b: int, first: int, count: int) -> None:
        raw_len = self.codec.raw_nbytes(self.layout, count, b - a)
        if self.codec.lossless:
            raw = torch.empty(raw_len, dtype=torch.uint8, device=self.cache.device)
        else:
            raw = t.connection.payload_buffer(raw_len, self.cache.device)
        streaming = StreamingChecksum() if streams_checksum(raw, self.codec.lossless) else None
        try:
            ids = t.block_tensor[first : first + count]
            codecs.encode(self.codec, self.cache, (a, b), ids, raw, streaming and streaming.update)
            payload = codecs.compress(self.codec, raw)
        except BaseException:
            t.connection.release_buffer(raw)
            raise
        alg = StreamingChecksum.alg if streaming else checksum_alg_for(payload)
        header = FrameHeader(
            version=FORMAT_VERSION,
            request_id=t.request_id,
            fingerprint=self.layout.fingerprint,
            layers=(a, b),
            block_ids=tuple(t.block_ids[first : first + count]),
            first_block=first,
            block_size=self.layout.block_size,
            num_kv_heads=self.layout.num_kv_heads,
            head_dim=self.layout.head_dim,
            dtype=self.layout.dtype,
            codec=self.codec.name,
            scale_layout=self.codec.scale_layout,
            lossless=self.codec.lossless,
            raw_len=raw_len,
            payload_len=payload.numel(),
            checksum=streaming.intdigest() if streaming else payload_checksum(payload, alg),
            checksum_alg=alg,
        )
        t.connection.send(Frame(header.encode(), payload))
        t.num_frames += 1

    def _tell_abort(self, t: OutgoingTransfer, reason: str) -> None:
        try:
            t.connection.abort(t.request_id, reason)
        except TransferError:
            pass  # best effort: the receiver's own deadline frees its side if this does not arrive

    def _close(self, t: OutgoingTransfer, state: SendState) -> None:
        """End a transfer: free its blocks (exactly once) and keep only its outcome."""
        if self._transfers.pop(t.request_id, None) is None:
            return
        self.allocator.free(t.block_ids)
        t.state = state
        self._outcomes[t.request_id] = state
        while len(self._outcomes) > _MAX_OUTCOMES:
            self._outcomes.popitem(last=False)
