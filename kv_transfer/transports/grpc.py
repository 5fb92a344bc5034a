"""The gRPC transport: frames cross nodes over one bidirectional KVTransfer.Stream call per connection
(proto/kv_transfer.proto holds the messages and the protocol).

    GrpcConnection.send(frame)                                   GrpcServer (one thread per stream)
      split into chunks of chunk_bytes ─► bounded queue ─► gRPC ─► reassemble into a CPU uint8 tensor
      (blocks while `window` bytes wait)                           ─► sink.on_frame   (one sink call
    GrpcConnection.end(request, n, timeout) ─► End ─────────────►  ─► sink.on_end      at a time per
      waits for the reply ◄───────────────── Ack | Error ◄──────                       server)

A sink error for a frame, a malformed frame, or one larger than the server's max_frame_bytes (refused
from its header, never buffered) is kept per request and returned from that request's `end`; later
frames of the request are dropped. If the stream breaks, the server aborts every request of it that
began but did not end, and the sender's pending and later calls raise PeerDisconnectedError.

Payload bytes skip protobuf's own copies: the sender appends a chunk's `data` field by hand to the
rest of the serialized chunk (the payload is copied once, into the message), and the receiver cuts the
field out as a view of the received message and copies it once, into the frame's tensor. Both stay
plain protobuf on the wire. Payload memory is reused on both sides (the sender's payload_buffer
staging buffers, the receiver's reassembly buffer): faulting in fresh pages costs more than the copy.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from kv_transfer.errors import (
    FrameError,
    FrameTooLargeError,
    PeerDisconnectedError,
    TransferError,
    TransferTimeoutError,
    TruncatedFrameError,
    UnauthenticatedError,
    error_from_wire,
    error_to_wire,
)
from kv_transfer.frame import MAX_HEADER_BYTES, decode_header
from kv_transfer.sink_endpoint import SinkEndpoint
from kv_transfer.stubs import load as load_stubs
from kv_transfer.transport import Connection, Frame, FrameSink, TransportServer

pb2, _ = load_stubs("kv_transfer")
logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20  # best of 0.5-4 MiB on loopback; from 4 MiB on, slower
MAX_CHUNK_BYTES = 64 << 20
DEFAULT_WINDOW_BYTES = 32 << 20
DEFAULT_MAX_FRAME_BYTES = 1 << 30
_HEAP_WARMUP_BYTES = 16 << 20  # below glibc's 32 MiB cap on the dynamic threshold
REUSE_MAX_BYTES = 64 << 20  # payload buffers up to this size are reused (fresh memory page-faults)
_NUM_SPARE_BUFFERS = 2
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + MAX_HEADER_BYTES + (64 << 10)  # a chunk, a header, the framing
_SERVICE = pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),  # ping an idle peer, so that a vanished one breaks the stream
    ("grpc.keepalive_timeout_ms", 20_000),
]
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # port 0 gets a port of its own
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # allow the senders' keepalive
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.http2.lookahead_bytes", 16 << 20),  # initial stream window: a new stream starts at speed
    *_KEEPALIVE,
]
_CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.use_local_subchannel_pool", 1),  # a TCP connection per GrpcConnection, not a shared one
    *_KEEPALIVE,
]
_DISCONNECTED = "peer disconnected"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _keep_message_buffers_on_the_heap() -> None:
    """gRPC allocates every message anew, and glibc serves blocks above its mmap threshold (128 KiB
    at first) with fresh mappings that page-fault on first touch: that halves throughput. Freeing one
    larger block raises the threshold to its size (mallopt(3): dynamic mmap threshold), so message
    buffers come from the heap. A no-op elsewhere."""
    bytes(_HEAP_WARMUP_BYTES)


# --- wire codec of KVMessage ---------------------------------------------------------------------

_CHUNK_KEY = 1 << 3 | 2  # KVMessage.chunk: field 1, length-delimited
_DATA_KEY = 4 << 3 | 2  # FrameChunk.data: field 4, length-delimited


@dataclass
class _Chunk:
    """A queued frame chunk; `data` is a view of the frame's payload, copied when serialized."""

    request_id: str
    seq: int
    header: bytes
    data: memoryview
    last: bool
    on_serialized: Callable[[], None] | None = None  # gives the frame's staging buffer back


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _serialize(item: _Chunk | object) -> bytes:
    """A _Chunk as KVMessage{chunk} bytes, its data field last; anything else is a KVMessage already."""
    if not isinstance(item, _Chunk):
        return item.SerializeToString()
    rest = pb2.FrameChunk(
        request_id=item.request_id, frame_seq=item.seq, header=item.header, last=item.last
    ).SerializeToString()
    data_len = _varint(len(item.data))
    chunk_len = _varint(len(rest) + 1 + len(data_len) + len(item.data))
    message = b"".join((bytes((_CHUNK_KEY,)), chunk_len, rest, bytes((_DATA_KEY,)), data_len, item.data))
    if item.on_serialized is not None:
        item.on_serialized()
    return message


def _deserialize(buf: bytes) -> tuple[object, memoryview]:
    """KVMessage bytes -> (the message without its chunk's data, a view of the data)."""
    view = memoryview(buf)
    if not buf or buf[0] != _CHUNK_KEY:
        message = pb2.KVMessage.FromString(buf)
        return message, memoryview(message.chunk.data)
    size, pos = _read_varint(view, 1)
    end = pos + size
    if end != len(buf):  # more fields after the chunk: not from a sender of this module
        message = pb2.KVMessage.FromString(buf)
        return message, memoryview(message.chunk.data)
    data, rest, rest_start = view[:0], [], pos
    while pos < end:  # the chunk's fields: keep all but data
        key, next_pos = _read_varint(view, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, next_pos = _read_varint(view, next_pos)
        elif wire_type == 2:
            length, next_pos = _read_varint(view, next_pos)
            if key == _DATA_KEY:
                rest.append(view[rest_start:pos])
                data, rest_start = view[next_pos : next_pos + length], next_pos + length
            next_pos += length
        elif wire_type in (1, 5):
            next_pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"KVMessage chunk field with wire type {wire_type}")
        pos = next_pos
    rest.append(view[rest_start:end])
    message = pb2.KVMessage()
    message.chunk.MergeFromString(b"".join(rest))
    return message, data


# --- receiver ------------------------------------------------------------------------------------


class GrpcServer(TransportServer):
    """Serves KVTransfer.Stream on `host:port` (port 0: any free port; `address` tells which),
    delivering frames to `sink`, one sink call at a time across all streams. The sink must not keep a
    frame's payload after on_frame returns: the stream reassembles its next frame there (as shm does).

    token: the shared secret every sender must present, else its call ends with UNAUTHENTICATED.
    tls: (private key PEM, certificate chain PEM) to serve over TLS instead of plain TCP.
    max_frame_bytes: larger frames (header + payload) are refused with FrameTooLargeError.
    max_streams: connections served at once (each holds a thread); more are refused.
    """

    def __init__(
        self,
        sink: FrameSink,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        tls: tuple[bytes, bytes] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_streams: int = 32,
    ) -> None:
        if max_frame_bytes <= 0 or max_streams <= 0:
            raise ValueError(
                f"max_frame_bytes ({max_frame_bytes}) and max_streams ({max_streams}) must be > 0"
            )
        _keep_message_buffers_on_the_heap()
        self.sink = sink
        self.max_frame_bytes = max_frame_bytes
        self._expected_auth = f"Bearer {token}".encode() if token is not None else None
        self._sink_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="kv-grpc-server")
        self._server = grpc.server(
            self._executor, options=_SERVER_OPTIONS, maximum_concurrent_rpcs=max_streams
        )
        handler = grpc.stream_stream_rpc_method_handler(
            self._serve_stream, request_deserializer=_deserialize, response_serializer=_serialize
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {"Stream": handler}),)
        )
        bind = _hostport(host, port)
        if tls is None:
            bound = self._server.add_insecure_port(bind)
        else:
            bound = self._server.add_secure_port(bind, grpc.ssl_server_credentials([tls]))
        self._address = _hostport(host, bound)
        self._server.start()

    @property
    def address(self) -> str:
        return self._address

    def close(self) -> None:
        self._server.stop(grace=None).wait()  # cancels every stream; each aborts its open requests
        self._executor.shutdown(wait=True)

    def _serve_stream(self, requests: Iterator, context: grpc.ServicerContext) -> Iterator:
        if self._expected_auth is not None:
            presented = dict(context.invocation_metadata()).get("authorization", "")
            if not hmac.compare_digest(presented.encode(), self._expected_auth):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong KV transfer token")
        stream = _ReceiveStream(self.sink, self._sink_lock, self.max_frame_bytes)
        context.add_callback(stream.abort_open_requests)  # runs however the call ends, cancel included
        try:
            yield pb2.KVReply(ready=pb2.Ready())
            for message, data in requests:
                reply = stream.handle(message, data)
                if reply is not None:
                    yield reply
        except grpc.RpcError:  # the sender cancelled, closed its channel or died
            pass
        finally:
            stream.abort_open_requests()


@dataclass
class _Assembly:
    """A frame being put back together from its chunks; payload None: drop its chunks."""

    request_id: str
    seq: int
    header: bytes
    payload: torch.Tensor | None = None
    received: int = 0


class _ReceiveStream:
    """The receiving state of one stream: the frame being reassembled, the requests that began and
    did not end, and the first error of each failed request (sent back at its End)."""

    def __init__(self, sink: FrameSink, sink_lock: threading.Lock, max_frame_bytes: int) -> None:
        self.sink = sink
        self.sink_lock = sink_lock
        self.max_frame_bytes = max_frame_bytes
        self.frame: _Assembly | None = None
        self.endpoint = SinkEndpoint(sink, sink_lock)  # open requests, first errors, sink calls
        self.buffer: torch.Tensor | None = None  # frames up to REUSE_MAX_BYTES are reassembled here

    def handle(self, message, data: memoryview) -> object | None:
        """Process one KVMessage (`data`: its chunk's payload bytes); returns the KVReply to send."""
        kind = message.WhichOneof("kind")
        if kind == "chunk":
            self._on_chunk(message.chunk, data)
            return None
        self._cut_short()
        if kind == "end":
            request_id = message.end.request_id
            error = self.endpoint.end(request_id, message.end.num_frames)
            if error is None:
                return pb2.KVReply(ack=pb2.Ack(request_id=request_id))
            name, text = error_to_wire(error)
            return pb2.KVReply(error=pb2.Error(request_id=request_id, error_class=name, message=text))
        if kind == "abort":
            self.endpoint.abort(message.abort.request_id, message.abort.reason)
        return None

    def abort_open_requests(self) -> None:
        """The stream ended or broke (gRPC's termination callback, any thread): drop what is open."""
        self.endpoint.abort_open(_DISCONNECTED)

    def _on_chunk(self, chunk, data: memoryview) -> None:
        if chunk.header:
            self._cut_short()
            self._begin(chunk)
        frame = self.frame
        if frame is None or chunk.frame_seq != frame.seq:
            self._cut_short()
            self._fail(chunk.request_id, FrameError(f"chunk of frame {chunk.frame_seq} without its start"))
            return
        if frame.payload is not None:
            end = frame.received + len(data)
            if end > frame.payload.numel():
                self._fail_frame(
                    frame, FrameError(f"frame {frame.seq} has more payload than its header says")
                )
            else:
                frame.payload.numpy()[frame.received : end] = np.frombuffer(data, dtype=np.uint8)
                frame.received = end
        if chunk.last:
            self.frame = None
            if frame.payload is not None and frame.received != frame.payload.numel():
                self._fail_frame(frame, self._truncated(frame))
            if frame.payload is not None:
                self.endpoint.frame(frame.request_id, Frame(frame.header, frame.payload))

    def _begin(self, chunk) -> None:
        request_id = chunk.request_id
        self.frame = _Assembly(request_id, chunk.frame_seq, chunk.header)
        if self.endpoint.has_failed(request_id):
            return
        self.endpoint.begin(request_id)
        try:
            header = decode_header(chunk.header)
            size = len(chunk.header) + header.payload_len
            if size > self.max_frame_bytes:
                raise FrameTooLargeError(
                    f"frame of {size} bytes for {request_id!r} exceeds this receiver's limit of "
                    f"{self.max_frame_bytes} bytes"
                )
            if header.request_id != request_id:
                raise FrameError(f"frame of request {header.request_id!r} sent as part of {request_id!r}")
        except TransferError as exc:
            self._fail(request_id, exc)
            return
        if header.payload_len > REUSE_MAX_BYTES:
            self.frame.payload = torch.empty(header.payload_len, dtype=torch.uint8)
            return
        if self.buffer is None or self.buffer.numel() < header.payload_len:
            self.buffer = torch.empty(header.payload_len, dtype=torch.uint8)
        self.frame.payload = self.buffer[: header.payload_len]

    def _cut_short(self) -> None:
        """Another message arrived while a frame was incomplete: that frame is truncated."""
        if self.frame is not None and self.frame.payload is not None:
            self._fail_frame(self.frame, self._truncated(self.frame))
        self.frame = None

    @staticmethod
    def _truncated(frame: _Assembly) -> TruncatedFrameError:
        return TruncatedFrameError(
            f"frame {frame.seq} of {frame.request_id!r} ended after {frame.received} of "
            f"{frame.payload.numel()} payload bytes"
        )

    def _fail_frame(self, frame: _Assembly, exc: TransferError) -> None:
        if frame.payload is not None:
            self._fail(frame.request_id, exc)
            frame.payload = None

    def _fail(self, request_id: str, exc: TransferError) -> None:
        """The transport refused a frame of the request (kept for its End; the sink lets it go now)."""
        self.endpoint.fail(request_id, exc)


# --- sender --------------------------------------------------------------------------------------


@dataclass
class _PendingEnd:
    done: bool = False
    error: TransferError | None = None


class GrpcConnection(Connection):
    """A sender's stream to one GrpcServer at `address` ("host:port"); connects, authenticates and
    waits for the server's Ready before returning (UnauthenticatedError, PeerDisconnectedError).

    send() splits a frame into chunks of `chunk_bytes` and queues them for gRPC's sending thread; it
    blocks while `window` bytes are queued (flow control). The payload is referenced, not copied,
    until it is serialized: do not modify it after send.
    token: the server's shared secret. tls: the root certificates (PEM) that signed the server's
    certificate, to connect over TLS.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls: bytes | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        window: int = DEFAULT_WINDOW_BYTES,
        connect_timeout: float = 10.0,
    ) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        _keep_message_buffers_on_the_heap()
        self.address = address
        self.chunk_bytes = chunk_bytes
        self.window = window
        self._lock = threading.Lock()  # guards the state below; the three conditions share it
        self._not_empty = threading.Condition(self._lock)  # the queue has a message, or the stream ended
        self._not_full = threading.Condition(self._lock)  # the queue has room, or the stream ended
        self._replied = threading.Condition(self._lock)  # Ready or a reply came, or the stream ended
        self._queue: deque[tuple[object, int]] = deque()  # (_Chunk or KVMessage, its payload bytes)
        self._queued_bytes = 0
        self._next_seq = 0
        self._is_ready = False
        self._closed = False
        self._error: TransferError | None = None  # set once the stream is broken
        self._pending: dict[str, _PendingEnd] = {}
        self._spare: list[torch.Tensor] = []  # staging buffers free for payload_buffer
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> staging buffer handed out, not yet sent
        self._send_lock = threading.Lock()  # a frame's chunks enter the queue together
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=_CLIENT_OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls)
            self._channel = grpc.secure_channel(address, credentials, options=_CLIENT_OPTIONS)
        stream = self._channel.stream_stream(
            f"/{_SERVICE}/Stream", request_serializer=_serialize, response_deserializer=pb2.KVReply.FromString
        )
        metadata = [("authorization", f"Bearer {token}")] if token is not None else None
        self._call = stream(self._messages(), metadata=metadata)
        self._reader = threading.Thread(target=self._read_replies, name="kv-grpc-replies", daemon=True)
        self._reader.start()
        with self._lock:
            ready = self._replied.wait_for(lambda: self._is_ready or self._error is not None, connect_timeout)
            error = self._error
        if not ready or error is not None:
            self.close()
            raise error or PeerDisconnectedError(
                f"no answer from the KV transfer server at {address} within {connect_timeout}s"
            )

    def payload_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A CPU staging buffer, reused once the frame sent from it is copied into messages: its memory
        is mapped already, so the codec writes at full speed. Do not touch it after send."""
        if torch.device(device).type != "cpu" or nbytes > REUSE_MAX_BYTES:
            return super().payload_buffer(nbytes, device)
        with self._lock:
            fits = [i for i, b in enumerate(self._spare) if b.numel() >= nbytes]
            buffer = self._spare.pop(fits[0]) if fits else torch.empty(nbytes, dtype=torch.uint8)
            self._lent[buffer.data_ptr()] = buffer
            while len(self._lent) > 2 * _NUM_SPARE_BUFFERS:  # lent and never sent: forget the oldest
                del self._lent[next(iter(self._lent))]
        return buffer[:nbytes]

    def release_buffer(self, buffer: torch.Tensor) -> None:
        with self._lock:
            staging = self._lent.pop(buffer.data_ptr(), None)
        if staging is not None:
            self._give_back(staging)

    def send(self, frame: Frame) -> None:
        request_id = decode_header(frame.header).request_id
        payload = frame.payload.detach()
        if payload.device.type != "cpu":  # to the host, into a reused staging buffer
            payload = self.payload_buffer(payload.numel(), torch.device("cpu")).copy_(payload)
        payload = payload.contiguous()
        data = memoryview(payload.numpy()) if payload.numel() else memoryview(b"")
        with self._lock:
            staging = self._lent.pop(payload.data_ptr(), None) if payload.numel() else None
        step = self.chunk_bytes
        with self._sending():
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            for start in range(0, max(len(data), 1), step):
                header, last = (frame.header if start == 0 else b""), start + step >= len(data)
                chunk = _Chunk(request_id, seq, header, data[start : start + step], last)
                if last and staging is not None:
                    chunk.on_serialized = functools.partial(self._give_back, staging)
                self._put(chunk, len(header) + len(chunk.data))

    def end(self, request_id: str, num_frames: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = _PendingEnd()
        with self._lock:
            self._pending[request_id] = pending
        try:
            with self._sending(deadline):
                self._put(
                    pb2.KVMessage(end=pb2.End(request_id=request_id, num_frames=num_frames)), 0, deadline
                )
            with self._lock:
                acked = self._replied.wait_for(lambda: pending.done, max(0.0, deadline - time.monotonic()))
        finally:
            with self._lock:
                if self._pending.get(request_id) is pending:
                    del self._pending[request_id]
        if pending.error is not None:
            raise pending.error
        if not acked:
            raise TransferTimeoutError(
                f"the KV transfer server at {self.address} did not acknowledge {request_id!r} "
                f"within {timeout}s"
            )

    def abort(self, request_id: str, reason: str) -> None:
        try:
            with self._sending():
                self._put(pb2.KVMessage(abort=pb2.Abort(request_id=request_id, reason=reason)), 0)
        except TransferError:
            pass  # the stream is gone, and with it the request: the server aborts it itself

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._queued_bytes = 0
            self._notify_all()
        self._call.cancel()
        self._reader.join()
        self._channel.close()

    def _give_back(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._spare = sorted([*self._spare, buffer], key=torch.Tensor.numel)[-_NUM_SPARE_BUFFERS:]

    @contextlib.contextmanager
    def _sending(self, deadline: float | None = None) -> Iterator[None]:
        """Hold the send lock: a frame's chunks, an End or an Abort enter the queue whole."""
        if not self._send_lock.acquire(
            timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())
        ):
            raise TransferTimeoutError(f"sending to {self.address} stayed blocked past the deadline")
        try:
            yield
        finally:
            self._send_lock.release()

    def _put(self, item: object, nbytes: int, deadline: float | None = None) -> None:
        """Queue one message, waiting while the window is full (a message alone may exceed it)."""
        with self._lock:
            has_room = self._not_full.wait_for(
                lambda: (
                    self._error is not None
                    or self._closed
                    or self._queued_bytes == 0
                    or self._queued_bytes + nbytes <= self.window
                ),
                None if deadline is None else max(0.0, deadline - time.monotonic()),
            )
            if self._error is not None:
                raise type(self._error)(str(self._error))
            if self._closed:
                raise PeerDisconnectedError(f"the connection to {self.address} is closed")
            if not has_room:
                raise TransferTimeoutError(f"sending to {self.address} stayed blocked past the deadline")
            self._queue.append((item, nbytes))
            self._queued_bytes += nbytes
            self._not_empty.notify()

    def _messages(self) -> Iterator:
        """The call's request stream, drained by gRPC's sending thread."""
        while True:
            with self._lock:
                self._not_empty.wait_for(lambda: self._queue or self._closed or self._error is not None)
                if self._closed or self._error is not None:
                    return
                item, nbytes = self._queue.popleft()
                self._queued_bytes -= nbytes
                if self._queued_bytes <= self.window // 2:  # wake senders with room to spare, not per chunk
                    self._not_full.notify_all()
            yield item

    def _read_replies(self) -> None:
        try:
            for reply in self._call:
                kind = reply.WhichOneof("kind")
                if kind == "ready":
                    with self._lock:
                        self._is_ready = True
                        self._replied.notify_all()
                elif kind == "ack":
                    self._settle(reply.ack.request_id, None)
                elif kind == "error":
                    error = reply.error
                    self._settle(error.request_id, error_from_wire(error.error_class, error.message))
            self._break(PeerDisconnectedError(f"the KV transfer server at {self.address} ended the stream"))
        except grpc.RpcError as exc:
            self._break(self._status_error(exc))

    def _status_error(self, exc: grpc.RpcError) -> TransferError:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return UnauthenticatedError(f"the KV transfer server at {self.address} refused us: {details}")
        if self._closed:
            return PeerDisconnectedError(f"the connection to {self.address} is closed")
        return PeerDisconnectedError(f"the stream to {self.address} broke: {code.name}: {details}")

    def _settle(self, request_id: str, error: TransferError | None) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
            if pending is not None:
                pending.done, pending.error = True, error
                self._replied.notify_all()

    def _break(self, error: TransferError) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
            for pending in self._pending.values():
                pending.done, pending.error = True, type(error)(str(error))
            self._pending.clear()
            self._notify_all()

    def _notify_all(self) -> None:
        self._not_empty.notify_all()
        self._not_full.notify_all()
        self._replied.notify_all()
