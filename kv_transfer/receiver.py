"""The decode side of a KV transfer: reserve blocks for a request, check every frame, decode it
straight into those blocks, and acknowledge when every (layer, block) has arrived exactly once.

    reserve(request, num_tokens) ──► RECEIVING (blocks allocated, deadline set)
        on_frame(frame)  ×N           checked, decoded into the reserved blocks
        on_end(request, N) ─────────► COMPLETE   take(request) hands the blocks to the decode engine
        bad frame / missing layers ─► FAILED     blocks freed, error kept for status()
        on_abort / abort ───────────► ABORTED    blocks freed
        expire() past the deadline ─► EXPIRED    blocks freed

A frame is checked before a byte of it touches the cache: header, layout, fingerprint, block
range, duplicates, payload length and checksum. Any failure fails the whole transfer (the
cluster retries the request) and frees its blocks; other transfers are unaffected. Transport
threads call on_frame/on_end/on_abort while the decode loop calls reserve/take/expire, so every
entry point holds one lock.

One rank of a tensor- or pipeline-parallel decode instance holds a rectangle of the model's
layers x KV heads (its `layout`); its pieces may come from several prefill ranks (`sources`, one
end each, kv_transfer/resharding.py), and it may receive into blocks its rank 0 reserved
(`adopt`: the blocks are not its to free).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockAllocator, blocks_needed
from kernels.kv_quant import copy_blocks
from kv_transfer import codecs
from kv_transfer.codecs import CodecSpec
from kv_transfer.errors import (
    FingerprintMismatchError,
    FrameError,
    FrameTooLargeError,
    LayerSequenceError,
    LayoutMismatchError,
    ReservationError,
    TransferAbortedError,
    TransferError,
    TransferTimeoutError,
    UnknownTransferError,
)
from kv_transfer.frame import (
    FrameHeader,
    StreamingChecksum,
    check_checksum,
    check_payload_length,
    decode_header,
    payload_checksum,
    streams_checksum,
    verify_payload,
)
from kv_transfer.layout import KVLayout
from kv_transfer.transport import Frame

DEFAULT_RECEIVE_TIMEOUT = 30.0
DEFAULT_MAX_FRAME_BYTES = 256 << 20
_MAX_OUTCOMES = 4096


class ReceiveState(enum.Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"
    ABORTED = "aborted"
    EXPIRED = "expired"


@dataclass
class IncomingTransfer:
    request_id: str
    num_tokens: int
    block_ids: list[int]
    deadline: float
    received: torch.Tensor  # bool [layers held, heads held, blocks]: which pieces arrived
    owned: bool = True  # the blocks are this receiver's to free (reserve, not adopt)
    sources: int = 1  # senders that each end the transfer
    num_frames: int = 0
    ends: int = 0
    frames_declared: int = 0  # by the ends so far
    state: ReceiveState = ReceiveState.RECEIVING


@dataclass(frozen=True)
class TransferOutcome:
    state: ReceiveState
    error: TransferError | None = field(default=None, compare=False)


class KVReceiver:
    """Implements kv_transfer.transport.FrameSink for one decode worker's KV cache."""

    def __init__(
        self,
        cache: torch.Tensor,
        layout: KVLayout,
        allocator: BlockAllocator | None,
        timeout: float = DEFAULT_RECEIVE_TIMEOUT,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.layout = layout
        self.allocator = allocator
        self.timeout = timeout
        self.max_frame_bytes = max_frame_bytes
        self.clock = clock
        self._lock = threading.RLock()
        self._transfers: dict[str, IncomingTransfer] = {}
        self._outcomes: OrderedDict[str, TransferOutcome] = OrderedDict()

    # --- the decode loop's side ---------------------------------------------------------------

    def reserve(
        self, request_id: str, num_tokens: int, timeout: float | None = None, sources: int = 1
    ) -> list[int]:
        """Allocate blocks for `num_tokens` of prompt KV; the transfer must complete within
        `timeout`, its pieces coming from `sources` senders."""
        with self._lock:
            self._check_reservation(request_id, num_tokens, sources)
            n = blocks_needed(num_tokens, self.layout.block_size)
            if self.allocator is None or not self.allocator.can_allocate(n):
                free = 0 if self.allocator is None else self.allocator.num_free_blocks
                raise ReservationError(f"request {request_id!r} needs {n} KV blocks, {free} are free")
            blocks = self.allocator.allocate(n)
            self._open(request_id, num_tokens, blocks, timeout, sources, owned=True)
            return list(blocks)

    def adopt(
        self,
        request_id: str,
        num_tokens: int,
        block_ids: list[int],
        timeout: float | None = None,
        sources: int = 1,
    ) -> None:
        """Receive into `block_ids`, reserved by someone else (rank 0 of this parallel instance),
        who frees them: this receiver only writes into them and forgets them when it ends."""
        with self._lock:
            self._check_reservation(request_id, num_tokens, sources)
            n = blocks_needed(num_tokens, self.layout.block_size)
            if len(block_ids) != n or not all(0 <= b < self.cache.shape[2] for b in block_ids):
                raise ReservationError(
                    f"request {request_id!r}: {len(block_ids)} block ids for {n} blocks "
                    f"(each below {self.cache.shape[2]}) expected"
                )
            self._open(request_id, num_tokens, list(block_ids), timeout, sources, owned=False)

    def _check_reservation(self, request_id: str, num_tokens: int, sources: int) -> None:
        if num_tokens <= 0:
            raise ReservationError(f"request {request_id!r}: num_tokens must be positive, got {num_tokens}")
        if sources < 1:
            raise ReservationError(f"request {request_id!r}: sources must be positive, got {sources}")
        if request_id in self._transfers:
            raise ReservationError(f"request {request_id!r} already has a reservation")

    def _open(
        self,
        request_id: str,
        num_tokens: int,
        blocks: list[int],
        timeout: float | None,
        sources: int,
        owned: bool,
    ) -> None:
        self._outcomes.pop(request_id, None)
        deadline = self.clock() + (self.timeout if timeout is None else timeout)
        lay = self.layout
        received = torch.zeros(lay.num_local_layers, lay.num_local_heads, len(blocks), dtype=torch.bool)
        self._transfers[request_id] = IncomingTransfer(
            request_id, num_tokens, blocks, deadline, received, owned, sources
        )

    def take(self, request_id: str) -> list[int]:
        """The blocks of a completed transfer, handed over to the caller (who frees them later)."""
        with self._lock:
            t = self._transfers.get(request_id)
            if t is None:
                raise self._not_receiving(request_id)
            if t.state is not ReceiveState.COMPLETE:
                raise TransferError(f"the transfer of {request_id!r} is not complete ({t.state.value})")
            del self._transfers[request_id]
            self._remember(request_id, TransferOutcome(ReceiveState.COMPLETE))
            return t.block_ids

    def abort(self, request_id: str, reason: str = "aborted by the decode side") -> None:
        """Drop a reservation (completed or not) and free its blocks. Unknown ids are ignored."""
        with self._lock:
            t = self._transfers.get(request_id)
            if t is not None:
                self._close(t, ReceiveState.ABORTED, TransferAbortedError(f"{request_id!r}: {reason}"))

    def expire(self) -> list[str]:
        """Free every transfer past its deadline: still receiving, or complete but never taken
        (the deadline restarts at completion). Returns their request ids."""
        with self._lock:
            now = self.clock()
            late = [t for t in self._transfers.values() if now >= t.deadline]
            for t in late:
                what = "did not arrive" if t.state is ReceiveState.RECEIVING else "was not taken"
                error = TransferTimeoutError(f"the KV of {t.request_id!r} {what} within its deadline")
                self._close(t, ReceiveState.EXPIRED, error)
            return [t.request_id for t in late]

    def status(self, request_id: str) -> TransferOutcome | None:
        with self._lock:
            t = self._transfers.get(request_id)
            return TransferOutcome(t.state) if t is not None else self._outcomes.get(request_id)

    def num_layers_received(self, request_id: str) -> int:
        """Layers of a transfer in progress that arrived whole (every block), for progress and metrics."""
        with self._lock:
            t = self._transfers.get(request_id)
            return 0 if t is None else int(t.received.flatten(1).all(dim=1).sum())

    @property
    def num_transfers(self) -> int:
        """Reservations not yet taken (receiving, or complete and waiting for take)."""
        with self._lock:
            return len(self._transfers)

    @property
    def num_reserved_blocks(self) -> int:
        """Blocks this receiver reserved (and will free) for transfers not yet taken."""
        with self._lock:
            return sum(len(t.block_ids) for t in self._transfers.values() if t.owned)

    # --- FrameSink: the transport's side --------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        with self._lock:
            try:
                header = decode_header(frame.header)
            except FrameError as exc:
                t = self._transfers.get(exc.request_id) if exc.request_id is not None else None
                if t is not None and t.state is ReceiveState.RECEIVING:
                    self._close(t, ReceiveState.FAILED, exc)
                raise
            t = self._receiving(header.request_id)
            try:
                self._check(header, t)
                first, last = header.first_block, header.first_block + header.num_blocks
                dst = torch.tensor(t.block_ids[first:last], dtype=torch.int64, device=self.cache.device)
                self._decode(header, frame.payload, dst)
                layers, heads = self._local(header)
            except TransferError as exc:
                self._close(t, ReceiveState.FAILED, exc)
                raise
            except Exception as exc:  # noqa: BLE001 - a bad frame must fail its transfer, not the worker
                error = TransferError(f"frame for {header.request_id!r} could not be decoded: {exc!r}")
                self._close(t, ReceiveState.FAILED, error)
                raise error from exc
            t.received[layers, heads, first:last] = True
            t.num_frames += 1

    def on_end(self, request_id: str, num_frames: int) -> None:
        """One sender is done (its frames, delivered in order before its end, all arrived): the
        transfer completes at the last sender's end, when every piece must be there."""
        with self._lock:
            t = self._receiving(request_id)
            t.ends += 1
            t.frames_declared += num_frames
            if t.ends < t.sources:
                return
            missing = (~t.received.flatten(1).all(dim=1)).nonzero().flatten().tolist()
            if missing or t.frames_declared != t.num_frames:
                layers = [self.layout.layers[0] + layer for layer in missing]
                what = f"with layers {_ranges(layers)} incomplete" if layers else "with frames missing"
                error = LayerSequenceError(
                    f"the transfer of {request_id!r} ended {what} "
                    f"({t.num_frames} of the {t.frames_declared} frames sent arrived)"
                )
                self._close(t, ReceiveState.FAILED, error)
                raise error
            t.state = ReceiveState.COMPLETE
            t.deadline = self.clock() + self.timeout  # to be taken by then, or freed by expire()

    def on_abort(self, request_id: str, reason: str) -> None:
        self.abort(request_id, f"aborted by the prefill side: {reason}")

    # --- internals ------------------------------------------------------------------------------

    def _decode(self, header: FrameHeader, payload: torch.Tensor, dst: torch.Tensor) -> None:
        """Check and decode one frame's payload into `dst` (this transfer's reserved blocks).

        A host payload without a lossless stage is checksummed piece by piece as the codec reads
        it (one pass over memory, not two) and compared at the end: a corrupted payload may have
        been written into the reserved blocks by then, and the transfer's failure frees them."""
        spec = CodecSpec(header.codec, header.lossless)
        layer_slice, head_slice = self._local(header)
        layers = (layer_slice.start, layer_slice.stop)
        cache = self.cache if header.heads == self.layout.heads else self.cache[..., head_slice, :]
        if header.by_reference:  # the sender's cache layers, mapped: copy the blocks straight out
            check_payload_length(header, payload)
            lay, (h0, h1) = self.layout, header.src_heads
            src = payload.view(lay.torch_dtype).view(
                header.num_layers, 2, header.src_blocks, lay.block_size, h1 - h0, lay.head_dim
            )
            src_ids = torch.tensor(header.block_ids[: len(dst)], dtype=torch.int64)
            src = src[..., header.heads[0] - h0 : header.heads[1] - h0, :]
            copy_blocks(cache[layer_slice], dst, src, src_ids)
            return
        if not (header.checksum_alg == StreamingChecksum.alg and streams_checksum(payload, header.lossless)):
            verify_payload(header, payload)
            raw = codecs.decompress(header.lossless, payload, header.raw_len)
            codecs.decode(spec, raw, cache, layers, dst)
            return
        check_payload_length(header, payload)
        streaming = StreamingChecksum()
        try:
            codecs.decode(spec, payload, cache, layers, dst, streaming.update)
        except Exception:
            check_checksum(header, payload_checksum(payload, header.checksum_alg))  # corruption first
            raise
        check_checksum(header, streaming.intdigest())

    def _local(self, h: FrameHeader) -> tuple[slice, slice]:
        """The frame's layers and heads in this cache's own numbering."""
        (l0, _), (h0, _) = self.layout.layers, self.layout.heads
        return slice(h.layers[0] - l0, h.layers[1] - l0), slice(h.heads[0] - h0, h.heads[1] - h0)

    def _receiving(self, request_id: str) -> IncomingTransfer:
        t = self._transfers.get(request_id)
        if t is None:
            raise self._not_receiving(request_id)
        if t.state is not ReceiveState.RECEIVING:
            raise LayerSequenceError(
                f"the transfer of {request_id!r} already completed; frame or end repeated"
            )
        if self.clock() >= t.deadline:
            error = TransferTimeoutError(f"the KV of {request_id!r} arrived after its deadline")
            self._close(t, ReceiveState.EXPIRED, error)
            raise error
        return t

    def _not_receiving(self, request_id: str) -> TransferError:
        outcome = self._outcomes.get(request_id)
        if outcome is None:
            return UnknownTransferError(f"no KV reservation for request {request_id!r}")
        if outcome.error is not None:
            return type(outcome.error)(f"{outcome.error} (the transfer had already ended)")
        return TransferError(f"the transfer of {request_id!r} already ended ({outcome.state.value})")

    def _check(self, h: FrameHeader, t: IncomingTransfer) -> None:
        mine = self.layout
        for name, theirs, ours in (
            ("block size", h.block_size, mine.block_size),
            ("KV heads", h.num_kv_heads, mine.num_kv_heads),
            ("head dim", h.head_dim, mine.head_dim),
            ("dtype", h.dtype, mine.dtype),
        ):
            if theirs != ours:
                raise LayoutMismatchError(
                    f"frame for {h.request_id!r} has {name} {theirs}, this cache {ours}"
                )
        if h.fingerprint != mine.fingerprint:
            raise FingerprintMismatchError(
                f"frame for {h.request_id!r} comes from another model or cache layout "
                f"(fingerprint {h.fingerprint}, this worker {mine.fingerprint})"
            )
        for name, (lo, hi), (held_lo, held_hi) in (
            ("layers", h.layers, mine.layers),
            ("KV heads", h.heads, mine.heads),
        ):
            if lo < held_lo or hi > held_hi:
                raise LayoutMismatchError(
                    f"frame for {h.request_id!r} carries {name} {lo}-{hi - 1}; this cache holds "
                    f"{held_lo}-{held_hi - 1}"
                )
        if h.first_block + h.num_blocks > len(t.block_ids):
            raise LayoutMismatchError(
                f"frame blocks {h.first_block}..{h.first_block + h.num_blocks - 1} exceed the "
                f"{len(t.block_ids)} blocks reserved for {h.request_id!r}"
            )
        if h.by_reference:
            self._check_reference(h)
        else:
            self._check_payload(h)
        layers, heads = self._local(h)
        seen = t.received[layers, heads, h.first_block : h.first_block + h.num_blocks]
        if seen.any():
            layer = h.layers[0] + int(seen.flatten(1).any(dim=1).nonzero()[0])
            raise LayerSequenceError(f"layer {layer} of {h.request_id!r} arrived twice")

    def _check_payload(self, h: FrameHeader) -> None:
        """A frame carrying its bytes: their size within limits and as the layout needs."""
        mine = self.layout
        if h.payload_len > self.max_frame_bytes or h.raw_len > self.max_frame_bytes:
            raise FrameTooLargeError(
                f"frame for {h.request_id!r} carries {max(h.payload_len, h.raw_len)} bytes; "
                f"this worker accepts at most {self.max_frame_bytes}"
            )
        spec = CodecSpec(h.codec, h.lossless)
        if h.scale_layout != spec.scale_layout:
            raise LayoutMismatchError(
                f"frame for {h.request_id!r} lays out {h.codec} scales as {h.scale_layout!r}; "
                f"this worker reads {spec.scale_layout!r} (mismatched pdserve builds?)"
            )
        num_layers = h.layers[1] - h.layers[0]
        expected = spec.raw_nbytes(mine, h.num_blocks, num_layers, h.num_heads)
        if h.raw_len != expected:  # checked before decompressing: the size comes from our own layout
            raise LayoutMismatchError(
                f"frame for {h.request_id!r} declares {h.raw_len} bytes of {h.codec} KV; "
                f"{h.num_blocks} blocks x {num_layers} layers need {expected}"
            )
        if not h.lossless and h.payload_len != h.raw_len:
            raise FrameError(f"frame for {h.request_id!r}: {h.payload_len} payload bytes but raw {h.raw_len}")

    def _check_reference(self, h: FrameHeader) -> None:
        """A frame read in place (the sender's cache layers): its geometry, and its blocks within it."""
        (h0, h1), lay = h.src_heads, self.layout
        if not (h0 <= h.heads[0] and h.heads[1] <= h1 <= lay.num_kv_heads):
            raise LayoutMismatchError(
                f"frame for {h.request_id!r} carries KV heads {h.heads} of a sender holding {h.src_heads}"
            )
        expected = (
            h.num_layers
            * 2
            * h.src_blocks
            * lay.block_size
            * (h1 - h0)
            * lay.head_dim
            * lay.torch_dtype.itemsize
        )
        if h.payload_len != expected or h.raw_len != expected:
            raise LayoutMismatchError(
                f"frame for {h.request_id!r} names {h.payload_len} bytes of the sender's cache; "
                f"{h.num_layers} layers of {h.src_blocks} blocks x {h1 - h0} heads are {expected}"
            )
        if any(b >= h.src_blocks for b in h.block_ids):
            raise LayoutMismatchError(
                f"frame for {h.request_id!r} names blocks beyond the sender's {h.src_blocks}"
            )

    def _close(self, t: IncomingTransfer, state: ReceiveState, error: TransferError | None) -> None:
        """End a transfer: free its blocks exactly once and remember the outcome."""
        if self._transfers.pop(t.request_id, None) is None:
            return
        if t.owned:
            self.allocator.free(t.block_ids)
        t.state = state
        self._remember(t.request_id, TransferOutcome(state, error))

    def _remember(self, request_id: str, outcome: TransferOutcome) -> None:
        self._outcomes[request_id] = outcome
        while len(self._outcomes) > _MAX_OUTCOMES:
            self._outcomes.popitem(last=False)


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)
