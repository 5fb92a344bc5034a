"""The prefill side of a KV transfer: encode a request's blocks into frames, send them, and hold the
blocks under a lease until the decode side acknowledges.

    start(request, blocks, connection)        the sender now owns one reference to the blocks
                                              (or routes: pieces of them to several receivers)
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

A transfer goes to one connection (the receiver holds what this cache holds), or along several
`Route`s, each carrying a rectangle of layers x KV heads to its own receiver: what one rank of a
tensor- or pipeline-parallel instance sends to the ranks of a decode instance laid out
differently (kv_transfer/resharding.py). Frames name layers and heads in the model's numbering.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
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


@dataclass(frozen=True)
class Route:
    """One receiver of a transfer and the model's `layers` x `heads` it gets (within the sender's)."""

    connection: Connection
    layers: range
    heads: range


@dataclass
class _RouteState:
    route: Route
    by_reference: bool = False  # the receiver reads this cache in place (shared memory, codec none)
    num_frames: int = 0


@dataclass
class OutgoingTransfer:
    request_id: str
    block_ids: list[int]
    routes: list[_RouteState]
    expires_at: float
    block_tensor: torch.Tensor  # block_ids as int64 on the cache's device
    layers_sent: int = 0  # of this cache's layers, counted from its first
    state: SendState = SendState.SENDING
    ending: bool = False  # finish() is waiting for the ack

    @property
    def num_frames(self) -> int:
        return sum(r.num_frames for r in self.routes)


class KVSender:
    def __init__(
        self,
        cache: torch.Tensor,  # this rank's cache, holding layout.layers x layout.heads
        layout: KVLayout,
        allocator: BlockAllocator | None,
        codec: CodecSpec | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`allocator` is None when the blocks belong to someone else (the other ranks of a parallel
        instance: rank 0 frees them once every rank has read them)."""
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

    def start(self, request_id: str, block_ids: list[int], to: Connection | Sequence[Route]) -> None:
        """Take over one reference to `block_ids` (the request's blocks, in order) under a lease;
        `to`: the connection that gets all of this cache's KV, or the routes that share it."""
        if not block_ids:
            raise TransferError(f"request {request_id!r} has no KV blocks to send")
        if isinstance(to, Connection):
            to = [Route(to, self.layout.layer_range, self.layout.head_range)]
        in_place = self.codec.name == "none" and not self.codec.lossless
        routes = [
            _RouteState(self._check_route(route), in_place and route.connection.by_reference(self.cache))
            for route in to
        ]
        if not routes:
            raise TransferError(f"request {request_id!r} has nowhere to send its KV")
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.cache.device)
        with self._lock:
            if request_id in self._transfers:
                raise TransferError(f"a transfer of {request_id!r} is already in progress")
            self._outcomes.pop(request_id, None)
            expires = self.clock() + self.lease_seconds
            self._transfers[request_id] = OutgoingTransfer(request_id, list(block_ids), routes, expires, ids)

    def _check_route(self, route: Route) -> Route:
        for name, span, held in (
            ("layers", route.layers, self.layout.layer_range),
            ("KV heads", route.heads, self.layout.head_range),
        ):
            if not len(span) or span.start < held.start or span.stop > held.stop:
                raise TransferError(
                    f"a route of {name} {span.start}-{span.stop - 1} is not within the "
                    f"{held.start}-{held.stop - 1} this cache holds"
                )
        return route

    def send_layers(self, request_id: str, upto: int) -> None:
        """Send this cache's layers [layers already sent, upto) (counted from its first layer): call
        as prefill finishes each layer."""
        with self._lock:
            t = self._active(request_id)
            held = self.layout.num_local_layers
            if not t.layers_sent <= upto <= held:
                raise ValueError(f"cannot send layers up to {upto}: {t.layers_sent} of {held} already sent")
            try:
                first_layer = self.layout.layers[0]
                for r in t.routes:
                    lo = max(t.layers_sent, r.route.layers.start - first_layer)
                    hi = min(upto, r.route.layers.stop - first_layer)
                    if r.by_reference and lo < hi:
                        self._send_reference(t, r, lo, hi)
                        continue
                    heads = len(r.route.heads)
                    for a, b, first, count in self._frame_plan(lo, hi, len(t.block_ids), heads):
                        self._send_frame(t, r, a, b, first, count)
            except Exception as exc:  # noqa: BLE001 - any failure ends the transfer, blocks freed
                error = exc if isinstance(exc, TransferError) else TransferError(f"sending failed: {exc!r}")
                self._tell_abort(t, f"failed on the prefill side: {error}")
                self._close(t, SendState.FAILED)
                raise error from (None if error is exc else exc)
            t.layers_sent = upto

    def send_all(self, request_id: str) -> None:
        self.send_layers(request_id, self.layout.num_local_layers)

    def finish(self, request_id: str, timeout: float | None = None) -> None:
        """Send what is left, then wait for the acknowledgement (within the lease); frees the blocks
        either way and raises the receiver's TransferError, or TransferTimeoutError."""
        with self._lock:
            self.send_all(request_id)
            t = self._transfers[request_id]
            t.ending = True
        try:  # not under the lock: the wait may be long, and aborts/expiry of others go on
            for r in t.routes:  # the receivers decode in parallel; waiting in turn costs the slowest
                wait = max(0.0, t.expires_at - self.clock())
                r.route.connection.end(
                    request_id, r.num_frames, wait if timeout is None else min(timeout, wait)
                )
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

    def _frame_plan(
        self, start: int, end: int, num_blocks: int, num_heads: int
    ) -> Iterator[tuple[int, int, int, int]]:
        """(layer_start, layer_end, first_block, num_blocks) per frame, each under max_frame_bytes."""
        per_layer = self.codec.raw_nbytes(self.layout, num_blocks, 1, num_heads)
        if per_layer <= self.max_frame_bytes:
            step = max(1, self.max_frame_bytes // per_layer)
            for a in range(start, end, step):
                yield a, min(a + step, end), 0, num_blocks
            return
        per_block = max(1, self.max_frame_bytes // self.codec.raw_nbytes(self.layout, 1, 1, num_heads))
        for layer in range(start, end):
            for first in range(0, num_blocks, per_block):
                yield layer, layer + 1, first, min(per_block, num_blocks - first)

    def _send_frame(
        self, t: OutgoingTransfer, r: _RouteState, a: int, b: int, first: int, count: int
    ) -> None:
        """One frame of this cache's layers [a, b) of blocks [first, first + count) along route `r`."""
        connection, heads = r.route.connection, r.route.heads
        raw_len = self.codec.raw_nbytes(self.layout, count, b - a, len(heads))
        if self.codec.lossless:
            raw = torch.empty(raw_len, dtype=torch.uint8, device=self.cache.device)
        else:
            raw = connection.payload_buffer(raw_len, self.cache.device)
        streaming = StreamingChecksum() if streams_checksum(raw, self.codec.lossless) else None
        h0 = self.layout.heads[0]
        cache = (
            self.cache
            if heads == self.layout.head_range
            else self.cache[..., heads.start - h0 : heads.stop - h0, :]
        )
        try:
            ids = t.block_tensor[first : first + count]
            codecs.encode(self.codec, cache, (a, b), ids, raw, streaming and streaming.update)
            payload = codecs.compress(self.codec, raw)
        except BaseException:
            connection.release_buffer(raw)
            raise
        alg = StreamingChecksum.alg if streaming else checksum_alg_for(payload)
        self._post(
            t,
            r,
            (a, b),
            payload,
            block_ids=tuple(t.block_ids[first : first + count]),
            first_block=first,
            codec=self.codec.name,
            scale_layout=self.codec.scale_layout,
            lossless=self.codec.lossless,
            raw_len=raw_len,
            checksum=streaming.intdigest() if streaming else payload_checksum(payload, alg),
            checksum_alg=alg,
        )

    def _send_reference(self, t: OutgoingTransfer, r: _RouteState, a: int, b: int) -> None:
        """One frame naming this cache's layers [a, b) where they lie, for a receiver that maps the
        cache (the one-copy path): it copies the request's blocks out itself."""
        payload = self.cache[a:b].reshape(-1).view(torch.uint8)
        self._post(
            t,
            r,
            (a, b),
            payload,
            block_ids=tuple(t.block_ids),
            first_block=0,
            codec="none",
            scale_layout="",
            lossless="",
            raw_len=payload.numel(),
            checksum=0,
            checksum_alg="none",
            by_reference=True,
            src_blocks=self.cache.shape[2],
            src_heads=self.layout.heads,
        )

    def _post(
        self, t: OutgoingTransfer, r: _RouteState, layers: tuple[int, int], payload: torch.Tensor, **fields
    ) -> None:
        """Send `payload` as a frame of this cache's `layers` along route `r`; `fields` are the
        header's codec, block and checksum fields."""
        first_layer, heads = self.layout.layers[0], r.route.heads
        header = FrameHeader(
            version=FORMAT_VERSION,
            request_id=t.request_id,
            fingerprint=self.layout.fingerprint,
            layers=(layers[0] + first_layer, layers[1] + first_layer),
            heads=(heads.start, heads.stop),
            block_size=self.layout.block_size,
            num_kv_heads=self.layout.num_kv_heads,
            head_dim=self.layout.head_dim,
            dtype=self.layout.dtype,
            payload_len=payload.numel(),
            **fields,
        )
        r.route.connection.send(Frame(header.encode(), payload))
        r.num_frames += 1

    def _tell_abort(self, t: OutgoingTransfer, reason: str) -> None:
        for r in t.routes:
            try:
                r.route.connection.abort(t.request_id, reason)
            except TransferError:
                pass  # best effort: the receiver's own deadline frees its side if this does not arrive

    def _close(self, t: OutgoingTransfer, state: SendState) -> None:
        """End a transfer: free its blocks (exactly once) and keep only its outcome."""
        if self._transfers.pop(t.request_id, None) is None:
            return
        if self.allocator is not None:
            self.allocator.free(t.block_ids)
        t.state = state
        self._outcomes[t.request_id] = state
        while len(self._outcomes) > _MAX_OUTCOMES:
            self._outcomes.popitem(last=False)
