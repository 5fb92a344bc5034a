"""Faults across real transports with a real KVReceiver: the sender sees the specific error, the
request is marked failed, and block accounting on both sides returns to its start."""

from __future__ import annotations

import time

import pytest
import torch
from kv_rig import BLOCK, TamperingConnection, make_rig

from kv_transfer.errors import ChecksumMismatchError, FrameTooLargeError, UnauthenticatedError
from kv_transfer.receiver import ReceiveState
from kv_transfer.sender import SendState
from kv_transfer.transport import Frame
from kv_transfer.transports import connect, serve

TRANSPORTS = ["local", "shm", "grpc"]


@pytest.fixture(params=TRANSPORTS)
def wired(request):
    """A rig whose receiver sits behind a real server of each transport kind."""
    rig = make_rig()
    options = {"token": "s3cret"} if request.param == "grpc" else {}
    server = serve(request.param, rig.receiver, **options)
    connection = connect(request.param, server.address, **options)
    yield rig, request.param, server, connection, options
    connection.close()
    server.close()


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_round_trip_over_each_transport(wired):
    rig, _, _, connection, _ = wired
    sender = rig.sender("int8", connection=connection)
    blocks = rig.start(sender, num_tokens=5 * BLOCK)
    sender.send_layers("r1", 2)
    sender.finish("r1", timeout=30)
    got = rig.receiver.take("r1")
    assert (rig.dst[:, :, got] - rig.src[:, :, blocks]).abs().max() < 0.05
    rig.decode_blocks.free(got)
    rig.assert_nothing_held()


def test_corrupted_frame_over_each_transport(wired):
    rig, kind, server, connection, options = wired

    def corrupt(frame: Frame) -> Frame:
        payload = frame.payload.clone()
        payload[7] ^= 1
        return Frame(frame.header, payload)

    class Corrupting(type(connection)):
        def send(self, frame: Frame) -> None:
            super().send(corrupt(frame))

    if kind == "local":
        wire = TamperingConnection(server.address, corrupt)
    else:
        connection.close()
        wire = Corrupting(server.address, **options)
    sender = rig.sender(connection=wire)
    rig.start(sender)
    with pytest.raises(ChecksumMismatchError):
        sender.finish("r1", timeout=30)
    assert sender.state("r1") is SendState.FAILED
    assert rig.receiver.status("r1").state is ReceiveState.FAILED
    rig.assert_nothing_held()
    wire.close()


def test_peer_disconnecting_mid_transfer_over_each_transport(wired):
    rig, _, _, connection, _ = wired
    sender = rig.sender(connection=connection)
    rig.start(sender)
    sender.send_layers("r1", 2)
    assert wait_for(lambda: rig.receiver.num_layers_received("r1") == 2)  # the frames are there
    connection.close()  # the prefill worker is gone
    assert wait_for(lambda: rig.receiver.status("r1").state is ReceiveState.ABORTED)
    assert rig.receiver.num_reserved_blocks == 0
    rig.clock.now += 31.0
    assert sender.expire() == ["r1"]  # the prefill side's lease frees its blocks
    rig.assert_nothing_held()


def test_oversized_frame_refused_by_the_receiver(wired):
    rig, kind, _, connection, _ = wired
    rig.receiver.max_frame_bytes = 1000
    sender = rig.sender(connection=connection)
    rig.start(sender)
    with pytest.raises(FrameTooLargeError):
        sender.finish("r1", timeout=30)
    assert rig.receiver.status("r1").state in (ReceiveState.FAILED, ReceiveState.ABORTED)
    rig.assert_nothing_held()


def test_unauthenticated_grpc_peer():
    """Refused at connect, before a byte of KV moves; the reservation made for it is freed by the
    receiver's deadline, and an authenticated sender right after is served."""
    rig = make_rig()
    server = serve("grpc", rig.receiver, token="s3cret")
    try:
        rig.receiver.reserve("r1", 40)
        for token in (None, "guess"):
            with pytest.raises(UnauthenticatedError, match="token"):
                connect("grpc", server.address, token=token)
        assert not rig.dst.any()
        rig.clock.now += 31.0
        assert rig.receiver.expire() == ["r1"]
        rig.assert_nothing_held()
        connection = connect("grpc", server.address, token="s3cret")
        sender = rig.sender(connection=connection)
        rig.start(sender, "r2")
        sender.finish("r2", timeout=30)
        assert rig.receiver.status("r2").state is ReceiveState.COMPLETE
        connection.close()
    finally:
        server.close()


def test_receiver_cache_untouched_by_rejected_frames():
    rig = make_rig()
    before = rig.dst.clone()
    server = serve("shm", rig.receiver)
    connection = connect("shm", server.address)
    try:
        sender = rig.sender(connection=connection)
        rig.start(sender)
        rig.receiver.max_frame_bytes = 1000
        with pytest.raises(FrameTooLargeError):
            sender.finish("r1", timeout=30)
        assert torch.equal(rig.dst, before)
    finally:
        connection.close()
        server.close()
