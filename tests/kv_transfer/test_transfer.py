"""KVSender -> transport -> KVReceiver: round trips, leases, aborts, and every bad frame failing
its transfer with a specific error while block accounting on both sides returns to the start."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import torch
from kv_rig import BLOCK, DIM, HEADS, LAYERS, RecordingConnection, TamperingConnection, make_rig

from kernels.kv_quant import CODECS
from kv_transfer.errors import (
    ChecksumMismatchError,
    FingerprintMismatchError,
    FrameTooLargeError,
    LayerSequenceError,
    LayoutMismatchError,
    ReservationError,
    TransferAbortedError,
    TransferTimeoutError,
    TruncatedFrameError,
    UnknownCodecError,
    UnknownTransferError,
    UnsupportedVersionError,
)
from kv_transfer.frame import PREFIX, decode_header
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import ReceiveState
from kv_transfer.sender import KVSender, SendState
from kv_transfer.transport import Frame


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_writes_the_receivers_own_blocks(rig, codec):
    rig.receiver.reserve("earlier", 2 * BLOCK)  # so the decode side's block ids differ
    sender = rig.sender(codec)
    src_blocks = rig.start(sender, num_tokens=40)  # 3 blocks
    sender.send_layers("r1", 1)  # layer-wise: layer 0 now, the rest at finish
    sender.finish("r1")
    dst_blocks = rig.receiver.take("r1")
    assert dst_blocks != src_blocks and len(dst_blocks) == 3
    got, want = rig.dst[:, :, dst_blocks], rig.src[:, :, src_blocks]
    if codec == "none":
        assert torch.equal(got, want)
    else:
        mean_error = {"fp8": 0.05, "int8": 0.01, "int4": 0.1}[codec]  # of unit-variance KV
        assert (got - want).abs().max() < 0.5 and (got - want).abs().mean() < mean_error
    assert sender.state("r1") is SendState.DONE and rig.prefill_blocks.num_free_blocks == 16
    rig.decode_blocks.free(dst_blocks)
    rig.receiver.abort("earlier")
    rig.assert_nothing_held()


def test_frames_are_split_to_stay_under_the_size_limit(rig):
    per_block_layer = rig.layout.bytes_per_block_layer
    sender = rig.sender(max_frame_bytes=2 * per_block_layer)
    src_blocks = rig.start(sender, num_tokens=5 * BLOCK)
    recorder = RecordingConnection()
    sender._transfers["r1"].connection = recorder
    sender.send_all("r1")
    assert len(recorder.frames) == LAYERS * 3  # blocks in frames of 2, 2, 1 per layer
    assert all(f.payload.numel() <= 2 * per_block_layer for f in recorder.frames)
    for frame in recorder.frames:
        rig.receiver.on_frame(frame)
    rig.receiver.on_end("r1", len(recorder.frames))
    assert torch.equal(rig.dst[:, :, rig.receiver.take("r1")], rig.src[:, :, src_blocks])


# --- bad frames: each fails its transfer with its own error, and nothing is leaked --------------


def recorded_frames(rig, codec="none", **sender_kwargs):
    recorder = RecordingConnection()
    sender = rig.sender(codec, connection=recorder, **sender_kwargs)
    rig.start(sender)
    sender.send_all("r1")
    return sender, recorder.frames


def with_header(frame: Frame, **changes) -> Frame:
    raw = msgpack.unpackb(frame.header[PREFIX.size :])
    raw.update(changes)
    body = msgpack.packb(raw)
    return Frame(PREFIX.pack(b"PDKV", len(body)) + body, frame.payload)


def corrupt_payload(frame: Frame) -> Frame:
    payload = frame.payload.clone()
    payload[payload.numel() // 2] ^= 0x40
    return Frame(frame.header, payload)


BAD_FRAMES = {
    "truncated payload": (lambda f: Frame(f.header, f.payload[:-100]), TruncatedFrameError),
    "checksum mismatch": (corrupt_payload, ChecksumMismatchError),
    "unknown codec": (lambda f: with_header(f, codec="int3"), UnknownCodecError),
    "unknown version": (lambda f: with_header(f, v=99), UnsupportedVersionError),
    "wrong head dim": (lambda f: with_header(f, hd=DIM * 2), LayoutMismatchError),
    "wrong dtype": (lambda f: with_header(f, dtype="bfloat16"), LayoutMismatchError),
    "other model": (lambda f: with_header(f, fp="0123456789abcdef"), FingerprintMismatchError),
    "layers past the model": (lambda f: with_header(f, layers=[LAYERS, LAYERS + 1]), LayoutMismatchError),
    "blocks past the reservation": (lambda f: with_header(f, first=2), LayoutMismatchError),
    "size disagrees with codec": (lambda f: with_header(f, codec="int8"), LayoutMismatchError),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frame_fails_the_transfer_and_frees_both_sides(rig, case):
    mutate, error = BAD_FRAMES[case]
    sender = rig.sender(connection=TamperingConnection(rig.server.address, mutate))
    rig.start(sender)
    before = rig.dst.clone()
    with pytest.raises(error):  # the receiver's error, carried back by the transport
        sender.finish("r1")
    assert sender.state("r1") is SendState.FAILED
    outcome = rig.receiver.status("r1")
    assert outcome.state is ReceiveState.FAILED and isinstance(outcome.error, error)
    assert torch.equal(rig.dst, before)  # nothing of a bad frame reaches the cache
    rig.assert_nothing_held()
    # The receiver keeps serving: a clean transfer right after succeeds.
    sender = rig.sender()
    blocks = rig.start(sender, "r2")
    sender.finish("r2")
    assert torch.equal(rig.dst[:, :, rig.receiver.take("r2")], rig.src[:, :, blocks])


def test_duplicated_layer(rig):
    _, frames = recorded_frames(rig)
    rig.receiver.on_frame(frames[0])
    with pytest.raises(LayerSequenceError, match="layer 0 .* twice"):
        rig.receiver.on_frame(frames[0])
    assert rig.receiver.status("r1").state is ReceiveState.FAILED
    rig.prefill_blocks.free(list(range(3)))  # the recording sender still holds them
    rig.assert_nothing_held()


def test_missing_layers(rig):
    _, frames = recorded_frames(rig, max_frame_bytes=rig.layout.bytes_per_block_layer * 3)
    for frame in frames[:1] + frames[2:]:
        rig.receiver.on_frame(frame)
    with pytest.raises(LayerSequenceError, match="layers 1 incomplete"):
        rig.receiver.on_end("r1", len(frames))
    assert rig.receiver.status("r1").state is ReceiveState.FAILED
    assert rig.receiver.num_reserved_blocks == 0


def test_oversized_frame():
    rig = make_rig(max_frame_bytes=1000)
    _, frames = recorded_frames(rig)
    with pytest.raises(FrameTooLargeError, match="at most 1000"):
        rig.receiver.on_frame(frames[0])
    assert rig.receiver.num_reserved_blocks == 0


def test_frame_for_a_request_without_reservation(rig):
    _, frames = recorded_frames(rig)
    stray = with_header(frames[0], req="nobody")
    with pytest.raises(UnknownTransferError, match="nobody"):
        rig.receiver.on_frame(stray)
    assert rig.receiver.status("r1").state is ReceiveState.RECEIVING  # others unaffected


def test_layout_mismatch_between_workers():
    """A receiver built for another head_dim refuses frames, even with a matching fingerprint."""
    layout = KVLayout(LAYERS, BLOCK, HEADS, DIM, "float32", "test-model")
    rig = make_rig(dataclasses.replace(layout, block_size=BLOCK * 2))
    recorder = RecordingConnection()
    sender = KVSender(rig.src, layout, rig.prefill_blocks)
    sender.start("r1", rig.prefill_blocks.allocate(3), recorder)
    sender.send_all("r1")
    rig.receiver.reserve("r1", 40)
    with pytest.raises(LayoutMismatchError, match="block size 16, this cache 32"):
        rig.receiver.on_frame(recorder.frames[0])


def test_reservation_refused_when_full(rig):
    rig.receiver.reserve("big", 20 * BLOCK)
    with pytest.raises(ReservationError, match="needs 5 KV blocks, 4 are free"):
        rig.receiver.reserve("more", 5 * BLOCK)
    rig.receiver.abort("big")
    rig.assert_nothing_held()


# --- leases, deadlines and aborts ---------------------------------------------------------------


def test_sender_lease_expiry_frees_both_sides(rig):
    sender = rig.sender(lease_seconds=30.0)
    rig.start(sender)
    sender.send_layers("r1", 2)
    rig.clock.now += 29.0
    assert sender.expire() == []
    rig.clock.now += 1.0
    assert sender.expire() == ["r1"]
    assert sender.state("r1") is SendState.EXPIRED
    assert rig.receiver.status("r1").state is ReceiveState.ABORTED  # told through the transport
    rig.assert_nothing_held()
    with pytest.raises(TransferTimeoutError, match="lease"):
        sender.send_layers("r1", 3)


def test_receiver_deadline_frees_reserved_blocks(rig):
    recorder = RecordingConnection()
    sender = rig.sender(connection=recorder)
    rig.start(sender)
    sender.send_all("r1")
    rig.clock.now += 31.0
    with pytest.raises(TransferTimeoutError, match="after its deadline"):
        rig.receiver.on_frame(recorder.frames[0])  # a straggler arriving late
    assert rig.receiver.status("r1").state is ReceiveState.EXPIRED
    assert rig.receiver.num_reserved_blocks == 0
    rig.receiver.reserve("r2", 10)
    rig.clock.now += 31.0
    assert rig.receiver.expire() == ["r2"]
    assert rig.decode_blocks.num_free_blocks == 24


def test_abort_from_the_prefill_side(rig):
    sender = rig.sender()
    rig.start(sender)
    sender.send_layers("r1", 1)
    sender.abort("r1", "client went away")
    assert sender.state("r1") is SendState.ABORTED
    outcome = rig.receiver.status("r1")
    assert outcome.state is ReceiveState.ABORTED and "client went away" in str(outcome.error)
    rig.assert_nothing_held()


def test_abort_from_the_decode_side(rig):
    sender = rig.sender()
    rig.start(sender)
    sender.send_layers("r1", 1)
    rig.receiver.abort("r1", "decode instance draining")
    with pytest.raises(TransferAbortedError, match="draining"):
        sender.finish("r1")
    assert sender.state("r1") is SendState.FAILED
    rig.assert_nothing_held()


def test_header_fields_round_trip(rig):
    _, frames = recorded_frames(rig, codec="int4")
    header = decode_header(frames[0].header)
    assert header.request_id == "r1" and header.codec == "int4" and header.layers == (0, LAYERS)
    assert header.block_ids == (0, 1, 2) and header.first_block == 0
    assert (header.block_size, header.num_kv_heads, header.head_dim) == (BLOCK, HEADS, DIM)
    assert header.fingerprint == rig.layout.fingerprint and header.payload_len == frames[0].payload.numel()
