"""Same-node transport: payloads travel through shared memory, a Unix socket carries control.

Per connection the sender allocates one ring buffer once (a memfd segment on the CPU, a CUDA
tensor on a GPU) and hands it to the receiver, which maps it once. Afterwards only small messages
cross the socket; payload bytes are written once by the sender (the codec writes straight into a
region obtained from `payload_buffer`) and read once by the receiver (the sink decodes from a view
of the region).

    ring: ring_bytes shared by both processes, mapped once per connection; regions are handed
    out in order and wrap around, so many small frames (one per layer) can be in flight at once
      [free.....|frame 7 (receiver reads)|frame 8|frame 9|frame 10 (sender writes)|free.......]
                 tail: oldest live region                                         head: next one

    control socket (shm:///tmp/pdserve-shm-XXXX/kv.sock), u32 length + msgpack list per message
    sender ──► receiver                                 receiver ──► sender
    hello     ring_bytes, device  + 1 memfd              ready  max_frame_bytes
              (CUDA: a pickled IPC handle instead)       error  None, class name, message
    frame     request, header, region, offset, plen      free   region      after on_frame returns
              (region None: nothing staged, plen is 0 or over max_frame_bytes)
    frame_fd  request, header, plen  + 1 memfd           free_oneoff        after on_frame returns
    share     segment, nbytes  + 1 memfd                 (no reply)  a shared KV cache, mapped read-only
    frame_ref request, header, segment, offset, plen     (no reply)  the payload read where it lies
    end       request, num_frames                        ack    request
                                                         error  request, class name, message
    abort     request, reason                            (no reply)

    a region's life: taken by payload_buffer/send ─► written ─► "frame" ─► sink.on_frame ─► "free"
    The receiver consumes one connection's frames in order, so regions come back in the order they
    were taken; a region lent by payload_buffer and given back unsent is marked free and the tail
    moves past it once everything older is free too.

A sender whose KV cache lives in shared memory (engine/kv_cache.py) shares it once per connection;
frames whose payload is a view of it ("ref" frames, kv_transfer/frame.py) then carry only where
it lies, and the receiver copies the request's blocks straight out of the sender's cache: one
copy in all, where a staged frame costs two (the sender's gather into the ring, the receiver's
scatter out of it). The sender holds those blocks until the ack, as for any frame.

Frames larger than the ring go through a one-off memfd of their exact size (one in flight at a
time; CUDA connections refuse them with FrameTooLargeError, raise ring_bytes instead). The sink
must not keep a frame's payload after on_frame returns: the region is reused.

Cleanup: segments are memfds, anonymous files with no name in /dev/shm. The kernel frees one
when its last descriptor and mapping are gone, so a peer that dies (even by SIGKILL) cannot leak
one; each side closes its descriptors right after mapping and unmaps when the connection ends.

CUDA: the ring is a CUDA tensor shared once through CUDA IPC (torch.multiprocessing.reductions);
the receiver's decode kernel reads the sender's region directly (one device-to-device copy). The
sender synchronizes its current stream before posting a frame (the codec must write on it), the
receiver synchronizes its device after on_frame before freeing the region. CUDA IPC needs two
processes; within one process use the local transport.

Linux only (memfd_create, SCM_RIGHTS). The socket lives in a private (0700) directory; the
peer is trusted (CUDA handles are pickled).
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import socket
import struct
import tempfile
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import torch

from engine.kv_cache import shared_segment
from kv_transfer.errors import (
    FrameTooLargeError,
    PeerDisconnectedError,
    TransferError,
    TransferTimeoutError,
    error_from_wire,
    error_to_wire,
)
from kv_transfer.frame import peek_request_id
from kv_transfer.sink_endpoint import SinkEndpoint
from kv_transfer.transport import Connection, Frame, FrameSink, TransportServer

logger = logging.getLogger(__name__)

SCHEME = "shm://"
DEFAULT_RING_BYTES = 128 << 20
DEFAULT_MAX_FRAME_BYTES = 1 << 30
ALIGN = 256  # region offsets: a whole number of cache lines, and aligned for any dtype view or kernel
_MAX_FDS = 4  # descriptors one control message may carry
_LENGTH = struct.Struct("<I")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # pre-fault the whole mapping at mmap time


class _Channel:
    """Length-prefixed msgpack messages over a Unix stream socket; a message may carry descriptors."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._send_lock = threading.Lock()

    def send(self, message: list, fds: Sequence[int] = ()) -> None:
        body = msgpack.packb(message)
        data = _LENGTH.pack(len(body)) + body
        with self._send_lock:
            if fds:
                data = data[socket.send_fds(self.sock, [data], list(fds)) :]
            self.sock.sendall(data)

    def recv(self) -> list:
        """The next message; raises EOFError when the peer has closed."""
        while True:
            if len(self._buffer) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._buffer)
                end = _LENGTH.size + length
                if len(self._buffer) >= end:
                    message = msgpack.unpackb(bytes(self._buffer[_LENGTH.size : end]))
                    del self._buffer[:end]
                    return message
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, _MAX_FDS)
            self._fds.extend(fds)
            if not data:
                raise EOFError("control socket closed")
            self._buffer += data

    def take_fds(self, count: int) -> list[int]:
        """The descriptors that came with the message just received (they arrive in send order)."""
        if len(self._fds) < count:
            raise TransferError(f"a control message announced {count} descriptors, {len(self._fds)} came")
        return [self._fds.popleft() for _ in range(count)]

    def shutdown(self) -> None:
        """Wake a thread blocked in recv (it sees EOF) and stop both directions."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())


def _map_fd(fd: int, nbytes: int, writable: bool = True) -> tuple[mmap.mmap, torch.Tensor]:
    size = os.fstat(fd).st_size
    if size < nbytes:  # reading past the end of a segment would kill this process with SIGBUS
        raise TransferError(f"a shared-memory segment of {size} bytes cannot hold {nbytes}")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE, prot=prot)
    except OSError as exc:
        raise TransferError(f"cannot map a {nbytes}-byte shared-memory segment: {exc}") from exc
    with warnings.catch_warnings():  # a read-only mapping: torch warns it cannot be written (it is not)
        warnings.simplefilter("ignore", UserWarning)
        return mapping, torch.frombuffer(mapping, dtype=torch.uint8)


def _new_segment(nbytes: int, name: str) -> tuple[int, mmap.mmap, torch.Tensor]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        return (fd, *_map_fd(fd, nbytes))
    except BaseException:
        os.close(fd)
        raise


def _unmap(mappings: list[mmap.mmap]) -> None:
    """Unmap; drop every tensor view first. A view someone still holds keeps its mapping alive."""
    for mapping in mappings:
        try:
            mapping.close()
        except BufferError:
            logger.debug("a shared-memory view is still referenced; it is unmapped when released")
    mappings.clear()


def _socket_path(address: str) -> str:
    if not address.startswith(SCHEME):
        raise ValueError(f"not a shared-memory transport address: {address!r} (expected {SCHEME}/path)")
    return address[len(SCHEME) :]


def _resolve(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _Ring:
    """The sender's bookkeeping of its ring buffer: live regions in the order they were taken.

    A region is taken by payload_buffer or send (ALIGN-rounded, contiguous, never split across the
    end: when it does not fit before the end it starts again at 0) and comes back when the
    receiver replies "free", or when a buffer lent by payload_buffer is given back unsent. Space is
    reclaimed from the oldest region on, so a free region behind a live one waits for it."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.size = buffer.numel()
        self._live: OrderedDict[int, list] = OrderedDict()  # offset -> [end, freed], oldest first
        self._head = 0  # where the next region starts when it fits before the end
        self._lent: dict[int, int] = {}  # offset -> end of regions lent by payload_buffer
        self._oneoff_free = True
        self.broken: str | None = None  # why the connection is unusable
        self._cond = threading.Condition()

    def _place(self, nbytes: int) -> int | None:
        """Where a region of `nbytes` (aligned) would start now, or None when there is no room."""
        if not self._live:
            return 0 if nbytes <= self.size else None
        tail = next(iter(self._live))
        if self._head > tail:  # live bytes are [tail, head): room after head, or before tail
            if self.size - self._head >= nbytes:
                return self._head
            return 0 if tail >= nbytes else None
        return self._head if tail - self._head >= nbytes else None  # live bytes wrap past the end

    def acquire(self, nbytes: int, timeout: float, lend: bool = False) -> int:
        """The offset of a fresh region of at least `nbytes` (<= size); waits for room."""
        need = -(-nbytes // ALIGN) * ALIGN
        placed: list[int] = []

        def ready() -> bool:
            if self.broken:
                return True
            offset = self._place(need)
            if offset is not None:
                placed.append(offset)
            return offset is not None

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise TransferTimeoutError(
                    f"no room for {nbytes} bytes in the shared-memory ring within {timeout:g} s"
                )
            if self.broken:
                raise PeerDisconnectedError(self.broken)
            offset = placed[-1]
            self._live[offset] = [offset + need, False]
            self._head = offset + need
            if lend:
                self._lent[offset] = offset + need
            return offset

    def release(self, offset: int) -> None:
        with self._cond:
            region = self._live.get(offset)
            if region is None:
                return
            region[1] = True
            while self._live and next(iter(self._live.values()))[1]:
                self._live.popitem(last=False)
            if not self._live:
                self._head = 0  # empty: start again at the front, whose pages are warm
            self._cond.notify_all()

    def take_lent(self, payload: torch.Tensor) -> tuple[int, int] | None:
        """(region, offset) when `payload` lies inside a region lent by payload_buffer; the region
        is then no longer lent (it is about to be posted)."""
        if payload.device != self.buffer.device:
            return None
        start = payload.data_ptr() - self.buffer.data_ptr()
        with self._cond:
            for region, end in self._lent.items():
                if region <= start and start + payload.numel() <= end:
                    del self._lent[region]
                    return region, start
        return None

    def acquire_oneoff(self, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._oneoff_free or self.broken, timeout):
                raise TransferTimeoutError(f"the previous oversized frame was not consumed in {timeout:g} s")
            if self.broken:
                raise PeerDisconnectedError(self.broken)
            self._oneoff_free = False

    def release_oneoff(self) -> None:
        with self._cond:
            self._oneoff_free = True
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        with self._cond:
            self.broken = reason
            self._cond.notify_all()


@dataclass
class _Pending:
    """An end() waiting for the receiver's ack or error."""

    done: threading.Event = field(default_factory=threading.Event)
    error: TransferError | None = None

    def resolve(self, error: TransferError | None) -> None:
        self.error = error
        self.done.set()


class ShmConnection(Connection):
    """The sending side. `device` is where the ring lives: "cpu" (a memfd segment) or a CUDA device
    (CUDA IPC). `ring_timeout` bounds how long payload_buffer/send wait for room in the ring."""

    def __init__(
        self,
        address: str,
        ring_bytes: int = DEFAULT_RING_BYTES,
        device: torch.device | str = "cpu",
        ring_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if ring_bytes < ALIGN:
            raise ValueError(f"the ring needs at least {ALIGN} bytes, got {ring_bytes}")
        self.address = address
        self._device = _resolve(device)
        self._ring_bytes = ring_bytes
        self._ring_timeout = ring_timeout
        self._mappings: list[mmap.mmap] = []
        self._shared: dict[int, tuple[int, int]] = {}  # a shared cache's address -> (segment, bytes)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._closed = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(_socket_path(address))
        except OSError as exc:
            sock.close()
            raise PeerDisconnectedError(f"no KV transfer server at {address!r}: {exc}") from exc
        self._channel = _Channel(sock)
        self._ring = _Ring(torch.empty(0, dtype=torch.uint8))
        try:
            self._ring = _Ring(self._handshake())
        except TimeoutError as exc:
            self._release()
            raise TransferTimeoutError(f"the KV transfer server at {address!r} did not answer") from exc
        except BaseException:
            self._release()
            raise
        sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_replies, name="shm-kv-replies", daemon=True)
        self._reader.start()

    def _handshake(self) -> torch.Tensor:
        hello = ["hello", self._ring_bytes, self._device.type]
        if self._device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            ring = torch.zeros(self._ring_bytes, dtype=torch.uint8, device=self._device)
            self._channel.send([*hello, pickle.dumps(reduce_tensor(ring))])
        else:
            fd, mapping, ring = _new_segment(self._ring_bytes, "pdserve-kv-ring")
            self._mappings.append(mapping)
            try:
                self._channel.send([*hello, None], [fd])
            finally:
                os.close(fd)
        reply = self._channel.recv()
        if reply[0] == "error":
            raise error_from_wire(reply[2], reply[3])
        self._max_frame_bytes = reply[1]
        return ring

    def _read_replies(self) -> None:
        reason = f"the KV transfer server at {self.address!r} closed the connection"
        try:
            while True:
                reply = self._channel.recv()
                kind = reply[0]
                if kind == "free":
                    self._ring.release(reply[1])
                elif kind == "free_oneoff":
                    self._ring.release_oneoff()
                elif kind == "error" and reply[1] is None:  # the server gives up on this connection
                    reason = f"{reason}: {reply[2]}: {reply[3]}"
                elif kind in ("ack", "error"):
                    with self._lock:
                        pending = self._pending.pop(reply[1], None)
                    if pending is not None:
                        pending.resolve(None if kind == "ack" else error_from_wire(reply[2], reply[3]))
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("shared-memory KV connection to %s: unreadable reply", self.address)
        self._disconnect("this connection was closed" if self._closed else reason)

    def _disconnect(self, reason: str) -> None:
        self._ring.fail(reason)
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for waiter in pending:
            waiter.resolve(PeerDisconnectedError(reason))

    def _check_open(self) -> None:
        if self._ring.broken:
            raise PeerDisconnectedError(self._ring.broken)

    def _post(self, message: list, fds: Sequence[int] = ()) -> None:
        try:
            self._channel.send(message, fds)
        except OSError as exc:
            raise PeerDisconnectedError(
                f"the KV transfer server at {self.address!r} went away: {exc}"
            ) from exc

    def _same_device(self, device: torch.device) -> bool:
        return _resolve(device) == self._device

    def payload_buffer(self, nbytes: int, device: torch.device | str) -> torch.Tensor:
        """A region of the ring when the payload fits it on this connection's device (blocks until
        there is room, TransferTimeoutError after ring_timeout); otherwise a plain tensor. Every
        buffer handed out must be sent or given back with release_buffer."""
        self._check_open()
        if 0 < nbytes <= self._ring_bytes and self._same_device(torch.device(device)):
            offset = self._ring.acquire(nbytes, self._ring_timeout, lend=True)
            return self._ring.buffer[offset : offset + nbytes]
        return super().payload_buffer(nbytes, torch.device(device))

    def release_buffer(self, buffer: torch.Tensor) -> None:
        lent = self._ring.take_lent(buffer.reshape(-1)) if buffer.numel() else None
        if lent is not None:
            self._ring.release(lent[0])

    def by_reference(self, tensor: torch.Tensor) -> bool:
        """True for a CPU tensor in a shared cache segment, which is shared with the receiver (once)."""
        if self._device.type != "cpu" or (segment := shared_segment(tensor)) is None:
            return False
        fd, offset, nbytes = segment
        start = tensor.data_ptr() - offset
        with self._lock:
            if start not in self._shared:
                self._check_open()
                self._post(["share", len(self._shared), nbytes], [fd])
                self._shared[start] = (len(self._shared), nbytes)
        return True

    def _reference(self, payload: torch.Tensor) -> tuple[int, int] | None:
        """(segment, offset) of a payload lying in a segment shared on this connection."""
        address = payload.data_ptr()
        for start, (segment, nbytes) in self._shared.items():
            if start <= address and address + payload.numel() <= start + nbytes:
                return segment, address - start
        return None

    def send(self, frame: Frame) -> None:
        """Post a frame. A payload from payload_buffer is posted in place, one in a shared cache by
        reference; any other payload is copied into a fresh region (or a one-off segment when
        larger than the ring)."""
        self._check_open()
        request_id = peek_request_id(frame.header) or ""
        payload = frame.payload.reshape(-1)
        length = payload.numel()
        if length and self._shared and (where := self._reference(payload)) is not None:
            self._post(["frame_ref", request_id, frame.header, *where, length])
            return
        lent = self._ring.take_lent(payload) if length else None
        if length == 0 or len(frame.header) + length > self._max_frame_bytes:
            if lent is not None:
                self._ring.release(lent[0])
            self._post(["frame", request_id, frame.header, None, 0, length])  # the receiver refuses it
            return
        if lent is None and length > self._ring_bytes:
            self._send_oneoff(request_id, frame.header, payload)
            return
        if lent is None:
            offset = self._ring.acquire(length, self._ring_timeout)
            self._ring.buffer[offset : offset + length].copy_(payload)
            lent = offset, offset
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()  # written before it is read
        self._post(["frame", request_id, frame.header, lent[0], lent[1], length])

    def _send_oneoff(self, request_id: str, header: bytes, payload: torch.Tensor) -> None:
        if self._device.type == "cuda":
            raise FrameTooLargeError(
                f"a {payload.numel()}-byte payload exceeds this CUDA connection's {self._ring_bytes}-byte "
                "ring; raise ring_bytes"
            )
        self._ring.acquire_oneoff(self._ring_timeout)
        fd, mapping, view = _new_segment(payload.numel(), "pdserve-kv-oneoff")
        try:
            view.copy_(payload)
            del view
            mapping.close()
            self._post(["frame_fd", request_id, header, payload.numel()], [fd])
        except BaseException:
            self._ring.release_oneoff()
            raise
        finally:
            os.close(fd)  # the descriptor in flight keeps the segment alive until the receiver maps it

    def end(self, request_id: str, num_frames: int, timeout: float) -> None:
        if timeout <= 0:
            raise TransferTimeoutError(f"transfer of {request_id!r} ran past its deadline")
        pending = _Pending()
        with self._lock:  # _disconnect marks the ring broken before it takes this lock
            self._check_open()
            self._pending[request_id] = pending
        try:
            self._post(["end", request_id, num_frames])
        except TransferError:
            with self._lock:
                self._pending.pop(request_id, None)
            raise
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(request_id, None)
            raise TransferTimeoutError(
                f"the receiver did not acknowledge {request_id!r} within {timeout:g} s"
            )
        if pending.error is not None:
            raise pending.error

    def abort(self, request_id: str, reason: str) -> None:
        try:
            self._post(["abort", request_id, reason])
        except TransferError:
            logger.debug("abort of %r not delivered: the server is gone", request_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._channel.shutdown()
        self._reader.join()
        self._release()

    def _release(self) -> None:
        self._channel.close()
        self._ring.fail("this connection was closed")
        self._ring.buffer = torch.empty(0, dtype=torch.uint8)
        _unmap(self._mappings)


class _ServerConnection:
    """One sender's connection, handled on its own thread: maps its ring, delivers its frames."""

    def __init__(self, server: ShmServer, channel: _Channel) -> None:
        self.server = server
        self.channel = channel
        self.ring = torch.empty(0, dtype=torch.uint8)
        self.mappings: list[mmap.mmap] = []
        self.shared: dict[int, torch.Tensor] = {}  # the sender's shared caches, by segment
        self.device = torch.device("cpu")
        self.endpoint = SinkEndpoint(server.sink, server.sink_lock)

    def run(self) -> None:
        try:
            self._accept_ring(self.channel.recv())
            while True:
                message = self.channel.recv()
                kind = message[0]
                if kind == "frame":
                    self._frame(*message[1:])
                    if message[3] is not None:
                        self._reply(["free", message[3]])
                elif kind == "frame_fd":
                    (fd,) = self.channel.take_fds(1)
                    self._frame(*message[1:3], None, 0, message[3], fd)
                    self._reply(["free_oneoff"])
                elif kind == "share":
                    self._share(*message[1:])
                elif kind == "frame_ref":
                    self._frame_ref(*message[1:])
                elif kind == "end":
                    self._end(*message[1:])
                elif kind == "abort":
                    self.endpoint.abort(*message[1:])
                else:
                    raise TransferError(f"unknown control message {kind!r}")
        except (EOFError, OSError):
            pass
        except Exception as exc:
            logger.exception("shared-memory KV connection failed")
            self._reply(["error", None, *error_to_wire(exc)])
        finally:
            self.ring = torch.empty(0, dtype=torch.uint8)
            _unmap(self.mappings)
            self.channel.close()
            self.endpoint.abort_open("server closed" if self.server.closing else "peer disconnected")

    def _reply(self, message: list) -> None:
        try:
            self.channel.send(message)
        except OSError:
            logger.debug("reply %s not delivered: the sender is gone", message[0])

    def _accept_ring(self, hello: list) -> None:
        if len(hello) != 4 or hello[0] != "hello" or not isinstance(hello[1], int) or hello[1] < ALIGN:
            raise TransferError(
                f"expected a hello naming a ring of at least {ALIGN} bytes, got {hello[:3]!r}"
            )
        _, ring_bytes, device, handle = hello
        if device == "cuda":
            self.ring = _rebuild_cuda(handle)
            self.device = self.ring.device
        else:
            (fd,) = self.channel.take_fds(1)
            try:
                mapping, self.ring = _map_fd(fd, ring_bytes)
                self.mappings.append(mapping)
            finally:
                os.close(fd)
        self._reply(["ready", self.server.max_frame_bytes])

    def _frame(
        self,
        request_id: str,
        header: bytes,
        region: int | None,
        offset: int,
        length: int,
        fd: int | None = None,
    ) -> None:
        mapping = None
        try:
            if self.endpoint.has_failed(request_id):
                return
            if len(header) + length > self.server.max_frame_bytes:
                self.endpoint.fail(
                    request_id,
                    FrameTooLargeError(
                        f"a {len(header) + length}-byte frame of {request_id!r} exceeds this receiver's "
                        f"limit of {self.server.max_frame_bytes} bytes"
                    ),
                )
                return
            if fd is not None:
                mapping, payload = _map_fd(fd, length)
            elif region is not None and 0 <= offset and offset + length <= self.ring.numel():
                payload = self.ring[offset : offset + length]
            elif region is None and length == 0:
                payload = torch.empty(0, dtype=torch.uint8, device=self.device)
            else:
                raise TransferError(
                    f"frame of {request_id!r} names bytes outside the ring ({offset}, {length})"
                )
            self.endpoint.frame(request_id, Frame(header, payload))
            if payload.is_cuda:
                torch.cuda.synchronize(payload.device)  # the sink is done reading before its region is freed
        except TransferError as exc:
            self.endpoint.fail(request_id, exc)
        finally:
            payload = None
            if mapping is not None:
                _unmap([mapping])
            if fd is not None:
                os.close(fd)

    def _share(self, segment: int, nbytes: int) -> None:
        (fd,) = self.channel.take_fds(1)
        try:
            mapping, self.shared[segment] = _map_fd(fd, nbytes, writable=False)
            self.mappings.append(mapping)
        finally:
            os.close(fd)

    def _frame_ref(self, request_id: str, header: bytes, segment: int, offset: int, length: int) -> None:
        if self.endpoint.has_failed(request_id):
            return
        cache = self.shared.get(segment)
        if cache is None or offset < 0 or offset + length > cache.numel():
            self.endpoint.fail(
                request_id,
                TransferError(f"frame of {request_id!r} names bytes outside the sender's shared cache"),
            )
            return
        self.endpoint.frame(request_id, Frame(header, cache[offset : offset + length]))

    def _end(self, request_id: str, num_frames: int) -> None:
        error = self.endpoint.end(request_id, num_frames)
        self._reply(["ack", request_id] if error is None else ["error", request_id, *error_to_wire(error)])


def _rebuild_cuda(handle: bytes) -> torch.Tensor:
    rebuild, args = pickle.loads(handle)
    return rebuild(*args)


class ShmServer(TransportServer):
    """Listens on a Unix socket (a fresh private temp dir unless `path` is given); each connection is
    served on its own thread, and calls into the sink are serialized by one lock."""

    def __init__(
        self, sink: FrameSink, path: str | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> None:
        self.sink = sink
        self.sink_lock = threading.Lock()
        self.max_frame_bytes = max_frame_bytes
        self.closing = False
        self._own_dir = tempfile.mkdtemp(prefix="pdserve-shm-") if path is None else None
        self._path = path or os.path.join(self._own_dir, "kv.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._path)
        self._listener.listen()
        self._connections: dict[_ServerConnection, threading.Thread] = {}
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, name="shm-kv-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return SCHEME + self._path

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            connection = _ServerConnection(self, _Channel(sock))
            thread = threading.Thread(target=self._serve, args=(connection,), name="shm-kv-conn", daemon=True)
            with self._lock:
                if self.closing:
                    connection.channel.close()
                    return
                self._connections[connection] = thread
            thread.start()

    def _serve(self, connection: _ServerConnection) -> None:
        try:
            connection.run()
        finally:
            with self._lock:
                self._connections.pop(connection, None)

    def close(self) -> None:
        """Stop accepting and drop every connection (their senders see PeerDisconnectedError; their
        open requests are aborted in the sink); waits for the connection threads."""
        with self._lock:
            if self.closing:
                return
            self.closing = True
            connections = dict(self._connections)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._acceptor.join()
        for connection, thread in connections.items():
            connection.channel.shutdown()
            thread.join()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        if self._own_dir is not None:
            os.rmdir(self._own_dir)
