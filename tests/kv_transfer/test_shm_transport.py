"""The shared-memory transport: server and sender in threads of this process, plus real sender
processes (spawned) for the cross-process round trip and the killed-sender case."""

from __future__ import annotations

import multiprocessing
import os
import threading
import zlib

import pytest
import torch
from kv_rig import opaque_frame

from kv_transfer.errors import (
    FrameTooLargeError,
    LayoutMismatchError,
    PeerDisconnectedError,
    TransferError,
    TransferTimeoutError,
)
from kv_transfer.frame import decode_header, payload_checksum
from kv_transfer.transport import Frame
from kv_transfer.transports.shm import ALIGN, ShmConnection, ShmServer, _Ring

SLOT = 64 << 10  # the tests' rings hold two frames of this size
RING = 2 * SLOT
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_frame(request_id: str, index: int, payload: torch.Tensor) -> Frame:
    return opaque_frame(request_id, payload, layer=index)


def pattern(request_id: str, index: int, nbytes: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{request_id}:{index}".encode()))
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


class RecordingSink:
    """Records (kind, request, detail) events; raises `failures[(request, layer)]` for chosen frames;
    on_end waits for `release_end` when it is given."""

    def __init__(self, failures: dict | None = None, release_end: threading.Event | None = None) -> None:
        self.events: list[tuple] = []
        self.failures = failures or {}
        self.release_end = release_end
        self.in_end = threading.Event()
        self.cond = threading.Condition()

    def _record(self, event: tuple) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def on_frame(self, frame: Frame) -> None:
        header = decode_header(frame.header)
        error = self.failures.get((header.request_id, header.layers[0]))
        if error is not None:
            raise error
        assert payload_checksum(frame.payload.cpu(), "xxh3_64") == header.checksum
        self._record(("frame", header.request_id, header.layers[0], frame.payload.cpu().clone()))

    def on_end(self, request_id: str, num_frames: int) -> None:
        self.in_end.set()
        if self.release_end is not None:
            self.release_end.wait(10)
        self._record(("end", request_id, num_frames))

    def on_abort(self, request_id: str, reason: str) -> None:
        self._record(("abort", request_id, reason))

    def frames(self, request_id: str) -> list[tuple[int, torch.Tensor]]:
        return [(e[2], e[3]) for e in self.events if e[0] == "frame" and e[1] == request_id]

    def wait_for(self, predicate, timeout: float = 20.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.events), timeout), self.events


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def server(sink: RecordingSink):
    server = ShmServer(sink, max_frame_bytes=1 << 20)
    yield server
    server.close()


@pytest.fixture
def conn(server: ShmServer):
    conn = ShmConnection(server.address, ring_bytes=RING, ring_timeout=0.5)
    yield conn
    conn.close()


def shm_entries() -> set[str]:
    """/dev/shm, less the named semaphores of this test's own multiprocessing queues."""
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.mp-")}


def memfd_mappings() -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if "memfd:pdserve-kv" in line]


SIZES = [0, 1, 1000, SLOT - 1, SLOT, RING, RING + 1, 3 * RING + 5]  # the last two exceed the ring


def test_frames_of_every_size_arrive_identical_and_in_order(sink, conn):
    for i, size in enumerate(SIZES):
        conn.send(make_frame("r", i, pattern("r", i, size)))
    conn.end("r", len(SIZES), timeout=10)
    frames = sink.frames("r")
    assert [index for index, _ in frames] == list(range(len(SIZES)))
    for (i, payload), size in zip(frames, SIZES, strict=True):
        assert torch.equal(payload, pattern("r", i, size))
    assert sink.events[-1] == ("end", "r", len(SIZES))


def test_payload_buffer_is_a_ring_region_written_in_place(sink, conn):
    first = conn.payload_buffer(SLOT, torch.device("cpu"))
    second = conn.payload_buffer(SLOT, "cpu")
    with pytest.raises(TransferTimeoutError):  # both halves are lent: the ring is full
        conn.payload_buffer(10, "cpu")
    first.copy_(pattern("z", 0, SLOT))
    second.copy_(pattern("z", 1, SLOT))
    conn.send(make_frame("z", 0, first))
    conn.send(make_frame("z", 1, second))
    third = conn.payload_buffer(10, "cpu")  # room came back after the receiver consumed a frame
    assert third.data_ptr() in (first.data_ptr(), second.data_ptr())
    third.fill_(7)
    conn.send(make_frame("z", 2, third))
    conn.end("z", 3, timeout=10)
    frames = sink.frames("z")
    assert torch.equal(frames[0][1], pattern("z", 0, SLOT))
    assert torch.equal(frames[1][1], pattern("z", 1, SLOT))
    assert torch.equal(frames[2][1], torch.full((10,), 7, dtype=torch.uint8))
    assert conn.payload_buffer(RING + 1, "cpu").numel() == RING + 1  # too big for the ring: a plain tensor


def test_many_small_frames_are_in_flight_at_once(server, sink):
    """The ring is shared by bytes, not by a fixed number of slots: with the receiver stalled,
    a sender can still post as many layer-sized frames as the ring's bytes hold."""
    server.sink.release_end = release = threading.Event()
    conn = ShmConnection(server.address, ring_bytes=64 * 1024, ring_timeout=0.3)
    try:
        conn.send(make_frame("blocker", 0, pattern("blocker", 0, 10)))
        ender = threading.Thread(target=conn.end, args=("blocker", 1, 10))
        ender.start()
        assert sink.in_end.wait(10)  # the receiver's only thread now waits in on_end
        for i in range(60):  # 60 frames of 1,000 bytes (1,024 with alignment) fit in 64 KiB
            buffer = conn.payload_buffer(1000, "cpu")
            buffer.copy_(pattern("many", i, 1000))
            conn.send(make_frame("many", i, buffer))
        with pytest.raises(TransferTimeoutError, match="no room"):
            conn.payload_buffer(8 * 1024, "cpu")
        release.set()
        ender.join(10)
        conn.end("many", 60, timeout=10)
        frames = sink.frames("many")
        assert [i for i, _ in frames] == list(range(60))
        assert all(torch.equal(p, pattern("many", i, 1000)) for i, p in frames)
    finally:
        release.set()
        conn.close()


def test_ring_wraps_and_reclaims_in_order():
    ring = _Ring(torch.empty(8 * ALIGN, dtype=torch.uint8))
    a = ring.acquire(3 * ALIGN, timeout=0)
    b = ring.acquire(3 * ALIGN, timeout=0)
    assert (a, b) == (0, 3 * ALIGN)
    with pytest.raises(TransferTimeoutError):  # 2 aligned units left at the end: no room for 3
        ring.acquire(3 * ALIGN, timeout=0)
    ring.release(b)  # freed out of order: the space waits for the older region
    with pytest.raises(TransferTimeoutError):
        ring.acquire(3 * ALIGN, timeout=0)
    ring.release(a)  # everything free: the ring starts again at the front
    assert ring.acquire(ALIGN + 1, timeout=0) == 0  # rounded up to two units
    c = ring.acquire(4 * ALIGN, timeout=0)
    assert c == 2 * ALIGN
    ring.release(0)
    assert ring.acquire(2 * ALIGN, timeout=0) == 6 * ALIGN  # the end first, while it has room
    assert ring.acquire(2 * ALIGN, timeout=0) == 0  # then wrap to the freed front
    with pytest.raises(TransferTimeoutError):  # wrapped: the live region c bounds the room
        ring.acquire(1, timeout=0)
    ring.release(c)
    assert ring.acquire(ALIGN, timeout=0) == 2 * ALIGN


def test_ring_lends_regions_and_takes_them_back():
    ring = _Ring(torch.zeros(4 * ALIGN, dtype=torch.uint8))
    offset = ring.acquire(100, timeout=0, lend=True)
    inside = ring.buffer[offset + 10 : offset + 50]
    assert ring.take_lent(torch.zeros(5, dtype=torch.uint8)) is None  # not the ring's memory
    assert ring.take_lent(inside) == (offset, offset + 10)
    assert ring.take_lent(inside) is None  # taken once
    ring.release(offset)
    ring.fail("gone")
    with pytest.raises(PeerDisconnectedError, match="gone"):
        ring.acquire(1, timeout=1)


def test_interleaved_requests_keep_their_order(sink, conn):
    for i in range(6):
        for request_id in ("a", "b"):
            conn.send(make_frame(request_id, i, pattern(request_id, i, 5000 * (i + 1))))
    conn.end("a", 6, timeout=10)
    conn.end("b", 6, timeout=10)
    for request_id in ("a", "b"):
        frames = sink.frames(request_id)
        assert [i for i, _ in frames] == list(range(6))
        assert all(torch.equal(p, pattern(request_id, i, 5000 * (i + 1))) for i, p in frames)


def test_sink_error_surfaces_from_end_with_its_class(sink, conn):
    sink.failures = {("bad", 1): LayoutMismatchError("head dim 8 != 16"), ("odd", 0): ValueError("boom")}
    for i in range(3):
        conn.send(make_frame("bad", i, pattern("bad", i, 100)))
        conn.send(make_frame("good", i, pattern("good", i, 100)))
    conn.send(make_frame("odd", 0, pattern("odd", 0, 100)))
    with pytest.raises(LayoutMismatchError, match="head dim 8 != 16"):
        conn.end("bad", 3, timeout=10)
    with pytest.raises(TransferError, match="boom"):
        conn.end("odd", 1, timeout=10)
    conn.end("good", 3, timeout=10)
    assert [i for i, _ in sink.frames("bad")] == [0]  # frames after the failure were dropped
    assert [i for i, _ in sink.frames("good")] == [0, 1, 2]
    assert ("end", "bad", 3) not in sink.events


def test_end_times_out_when_the_ack_is_late(server, conn):
    release = threading.Event()
    server.sink.release_end = release
    conn.send(make_frame("slow", 0, pattern("slow", 0, 10)))
    with pytest.raises(TransferTimeoutError):
        conn.end("slow", 1, timeout=0.2)
    release.set()
    server.sink.release_end = None
    conn.send(make_frame("next", 0, pattern("next", 0, 10)))
    conn.end("next", 1, timeout=10)
    with pytest.raises(TransferTimeoutError):
        conn.end("next", 1, timeout=0)


def test_oversized_frame_fails_its_request_only(sink, server):
    conn = ShmConnection(server.address, ring_bytes=2 << 20)
    try:
        conn.send(make_frame("huge", 0, pattern("huge", 0, 2 << 20)))  # fits the ring, over max_frame_bytes
        conn.send(make_frame("huge2", 0, pattern("huge2", 0, 3 << 20)))  # over both
        conn.send(make_frame("fine", 0, pattern("fine", 0, 1000)))
        with pytest.raises(FrameTooLargeError, match="exceeds"):
            conn.end("huge", 1, timeout=10)
        with pytest.raises(FrameTooLargeError):
            conn.end("huge2", 1, timeout=10)
        conn.end("fine", 1, timeout=10)
        assert [e[1] for e in sink.events if e[0] == "frame"] == ["fine"]
    finally:
        conn.close()


def test_abort_reaches_the_sink_and_clears_a_failure(sink, conn):
    sink.failures = {("x", 0): LayoutMismatchError("no")}
    conn.send(make_frame("x", 0, pattern("x", 0, 10)))
    conn.abort("x", "prefill cancelled")
    conn.send(make_frame("y", 0, pattern("y", 0, 10)))
    conn.end("y", 1, timeout=10)
    assert ("abort", "x", "prefill cancelled") in sink.events


def test_server_close_fails_pending_and_later_calls(sink, server, conn):
    sink.release_end = release = threading.Event()
    conn.send(make_frame("p", 0, pattern("p", 0, 10)))
    outcome = []

    def end() -> None:
        try:
            conn.end("p", 1, timeout=20)
        except TransferError as exc:
            outcome.append(exc)

    ender = threading.Thread(target=end)
    ender.start()
    assert sink.in_end.wait(10)
    closer = threading.Thread(target=server.close)
    closer.start()
    ender.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], PeerDisconnectedError)
    release.set()
    closer.join(10)
    with pytest.raises(PeerDisconnectedError):
        conn.send(make_frame("q", 0, pattern("q", 0, 10)))
    with pytest.raises(PeerDisconnectedError):
        conn.end("q", 1, timeout=1)
    with pytest.raises(PeerDisconnectedError):
        ShmConnection(server.address)


def test_close_leaves_no_shared_memory_behind(sink):
    before = shm_entries()
    server = ShmServer(sink)
    conn = ShmConnection(server.address, ring_bytes=RING)
    assert len(memfd_mappings()) == 2  # the ring, mapped by each side
    conn.send(make_frame("r", 0, pattern("r", 0, 2 * RING)))
    conn.send(make_frame("open", 0, pattern("open", 0, 10)))
    conn.end("r", 1, timeout=10)
    conn.close()
    sink.wait_for(lambda events: ("abort", "open", "peer disconnected") in events)
    address = server.address
    server.close()
    assert memfd_mappings() == []
    assert shm_entries() == before
    assert not os.path.exists(address.removeprefix("shm://"))


def _child_sender(address: str, device: str, report) -> None:
    """Runs in a spawned process: one complete request, then an open one, then waits to be killed."""
    try:
        conn = ShmConnection(address, ring_bytes=RING, device=device)
        for i, size in enumerate(SIZES[:-2] if device != "cpu" else SIZES):
            buffer = conn.payload_buffer(size, torch.device(device))
            buffer.copy_(pattern("child", i, size))
            conn.send(make_frame("child", i, buffer))
        conn.end("child", i + 1, timeout=20)
        conn.send(make_frame("open", 0, pattern("open", 0, 100).to(device)))
        report.put("sent")
    except Exception as exc:
        report.put(repr(exc))
    threading.Event().wait(60)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_sender_process_round_trip_then_killed(sink, device):
    before = shm_entries()
    server = ShmServer(sink)
    context = multiprocessing.get_context("spawn")
    report = context.Queue()
    child = context.Process(target=_child_sender, args=(server.address, device, report), daemon=True)
    child.start()
    try:
        assert report.get(timeout=60) == "sent"
        sizes = SIZES[:-2] if device != "cpu" else SIZES
        frames = sink.frames("child")
        assert [i for i, _ in frames] == list(range(len(sizes)))
        for (i, payload), size in zip(frames, sizes, strict=True):
            assert torch.equal(payload, pattern("child", i, size))
        assert ("end", "child", len(sizes)) in sink.events
        sink.wait_for(lambda events: any(e[:2] == ("frame", "open") for e in events))
        child.kill()
        child.join(10)
        sink.wait_for(lambda events: ("abort", "open", "peer disconnected") in events)
    finally:
        child.kill()
        server.close()
    assert memfd_mappings() == []
    if device == "cpu":  # CUDA IPC keeps torch's own reference-count files there
        assert shm_entries() == before
