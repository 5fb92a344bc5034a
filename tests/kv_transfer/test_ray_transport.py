"""The Ray object-store baseline transport, against a real (one-CPU) local Ray instance."""

from __future__ import annotations

import pytest
import torch
from kv_rig import opaque_frame

from kv_transfer.errors import LayoutMismatchError, PeerDisconnectedError, TransferError
from kv_transfer.frame import decode_header, payload_checksum
from kv_transfer.transport import Frame

ray = pytest.importorskip("ray")

from kv_transfer.transports.ray import RayConnection, RayServer  # noqa: E402


def make_frame(request_id: str, index: int, nbytes: int) -> Frame:
    payload = torch.arange(nbytes, dtype=torch.int64).add_(index).to(torch.uint8)
    return opaque_frame(request_id, payload, layer=index)


class RecordingSink:
    """Records (kind, request, detail...) events; raises `failures[request] = (layer, error)`."""

    def __init__(self, failures: dict[str, tuple[int, Exception]] | None = None) -> None:
        self.events: list[tuple] = []
        self.failures = failures or {}

    def on_frame(self, frame: Frame) -> None:
        header = decode_header(frame.header)
        layer, error = self.failures.get(header.request_id, (None, None))
        if header.layers[0] == layer:
            raise error
        same = payload_checksum(frame.payload, "xxh3_64") == header.checksum
        self.events.append(("frame", header.request_id, header.layers[0], frame.payload.numel(), same))

    def on_end(self, request_id: str, num_frames: int) -> None:
        self.events.append(("end", request_id, num_frames))

    def on_abort(self, request_id: str, reason: str) -> None:
        self.events.append(("abort", request_id, reason))


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_round_trip_interleaved():
    sink = RecordingSink()
    server = RayServer(sink)
    conn = RayConnection(server.address)
    sizes = [0, 10, 300_000]
    for i, size in enumerate(sizes):
        conn.send(make_frame("a", i, size))
        conn.send(make_frame("b", i, size + 1))
    conn.end("a", 3, timeout=60)
    conn.end("b", 3, timeout=60)
    assert [e for e in sink.events if e[1] == "a"] == [
        *[("frame", "a", i, n, True) for i, n in enumerate(sizes)],
        ("end", "a", 3),
    ]
    assert [e[2:] for e in sink.events if e[:2] == ("frame", "b")] == [
        (i, n + 1, True) for i, n in enumerate(sizes)
    ]
    conn.close()
    server.close()


def test_sink_error_surfaces_from_end_and_abort_reaches_sink():
    sink = RecordingSink(
        {"bad": (1, LayoutMismatchError("head dim 8 != 16")), "odd": (0, ValueError("boom"))}
    )
    server = RayServer(sink, name="kv-test", namespace="pdserve-test")
    assert server.address == "ray://pdserve-test/kv-test"
    conn = RayConnection(server.mailbox)
    for i in range(3):
        conn.send(make_frame("bad", i, 100))
        conn.send(make_frame("good", i, 100))
    conn.send(make_frame("odd", 0, 100))
    with pytest.raises(LayoutMismatchError, match="head dim 8 != 16"):
        conn.end("bad", 3, timeout=60)
    with pytest.raises(TransferError, match="boom"):
        conn.end("odd", 1, timeout=60)
    conn.send(make_frame("gone", 0, 100))
    conn.abort("gone", "prefill cancelled")
    conn.send(make_frame("open", 0, 100))
    conn.end("good", 3, timeout=60)
    assert [e[2] for e in sink.events if e[:2] == ("frame", "bad")] == [0]
    assert ("end", "good", 3) in sink.events and ("abort", "gone", "prefill cancelled") in sink.events
    server.close()
    assert sink.events[-1] == ("abort", "open", "server closed")
    conn.send(make_frame("late", 0, 10))
    with pytest.raises(PeerDisconnectedError):
        conn.end("late", 1, timeout=60)
    with pytest.raises(PeerDisconnectedError):
        RayConnection("ray://pdserve-test/no-such-actor")
