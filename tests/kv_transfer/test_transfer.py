"""KVSender -> transport -> KVReceiver: round trips, leases, aborts, and every bad frame failing
its transfer with a specific error while block accounting on both sides returns to the start."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import torch
from kv_rig import BLOCK, DIM, HEADS, LAYERS, RecordingConnection, TamperingConnection, make_rig  # noqa: I001

from kernels.kv_quant import CODECS
from kv_transfer.errors import (
    ChecksumMismatchError,
    FingerprintMismatchError,
    FrameError,
    FrameTooLargeError,
    LayerSequenceError,
    LayoutMismatchError,
    PeerDisconnectedError,
    ReservationError,
    TransferAbortedError,
    TransferError,
    TransferTimeoutError,
    TruncatedFrameError,
    UnknownCodecError,
    UnknownTransferError,
    UnsupportedVersionError,
)
from kv_transfer.frame import PREFIX, decode_header, payload_checksum
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
    recorder = RecordingConnection()
    sender = rig.sender(max_frame_bytes=2 * per_block_layer, connection=recorder)
    src_blocks = rig.start(sender, num_tokens=5 * BLOCK)
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
    "scale layout of another build": (lambda f: with_header(f, scales="k:bf16[token]"), LayoutMismatchError),
    "raw length lies": (lambda f: with_header(f, raw=7), LayoutMismatchError),
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
    if case == "checksum mismatch":
        # Host payloads are checksummed as they are decoded (one pass over memory), so a corrupted
        # one may reach the request's own reserved blocks, which its failure freed; never others.
        others = [b for b in range(rig.dst.shape[2]) if b not in rig.reserved["r1"]]
        assert torch.equal(rig.dst[:, :, others], before[:, :, others])
    else:
        assert torch.equal(rig.dst, before)  # checked before decoding: nothing reaches the cache
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


# --- the review's cases: decompression bombs, send failures, late completion, disconnects -----


def test_zstd_bomb_is_refused_before_allocating(rig):
    import zstandard

    sender, frames = recorded_frames(rig)
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 26))  # 64 MiB of zeros, ~2 KiB
    payload = torch.frombuffer(bytearray(bomb), dtype=torch.uint8)
    from kv_transfer.frame import payload_checksum

    forged = with_header(
        frames[0], lossless="zstd", plen=payload.numel(), csum=payload_checksum(payload, "xxh3_64")
    )
    with pytest.raises(FrameError, match="declares 67108864 bytes"):
        rig.receiver.on_frame(Frame(forged.header, payload))
    assert rig.receiver.status("r1").state is ReceiveState.FAILED
    sender.abort("r1")
    rig.assert_nothing_held()


@pytest.mark.parametrize("stage", ["zstd", "lz4"])
def test_lossless_frames_round_trip_and_trailing_bytes_are_refused(rig, stage):
    from kv_transfer.codecs import CodecSpec

    sender, frames = recorded_frames(rig, CodecSpec("int8", stage))
    frame = frames[0]
    padded = torch.cat([frame.payload, torch.zeros(5, dtype=torch.uint8)])
    tampered = with_header(frame, plen=padded.numel(), csum=payload_checksum(padded, "xxh3_64"))
    with pytest.raises(FrameError, match="5 bytes after"):
        rig.receiver.on_frame(Frame(tampered.header, padded))
    sender.abort("r1")
    # The untampered frame decodes.
    rig.receiver.reserve("r1", 40)
    rig.receiver.on_frame(frame)
    rig.receiver.on_end("r1", 1)
    received = rig.dst[:, :, rig.receiver.take("r1")]
    assert (received - rig.src[:, :, [0, 1, 2]]).abs().max() < 0.05


def test_send_failure_releases_the_receivers_reservation(rig):
    class BrokenWire(RecordingConnection):
        def send(self, frame):
            raise PeerDisconnectedError("the link dropped")

        def abort(self, request_id, reason):
            rig.receiver.on_abort(request_id, reason)

    sender = rig.sender(connection=BrokenWire())
    rig.start(sender)
    with pytest.raises(PeerDisconnectedError):
        sender.finish("r1")
    assert sender.state("r1") is SendState.FAILED
    assert rig.receiver.status("r1").state is ReceiveState.ABORTED
    rig.assert_nothing_held()


def test_encode_failure_fails_the_transfer_and_gives_the_buffer_back(rig, monkeypatch):
    from kv_transfer import codecs

    released = []

    class Wire(RecordingConnection):
        def release_buffer(self, buffer):
            released.append(buffer.numel())

    sender = rig.sender(connection=Wire())
    rig.start(sender)

    def broken_encode(*args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(codecs, "encode", broken_encode)
    with pytest.raises(TransferError, match="CUDA out of memory"):
        sender.send_all("r1")
    assert released and sender.state("r1") is SendState.FAILED
    assert rig.prefill_blocks.num_free_blocks == 16


def test_completed_transfer_never_taken_is_freed(rig):
    sender = rig.sender()
    rig.start(sender)
    sender.finish("r1")
    assert rig.receiver.status("r1").state is ReceiveState.COMPLETE
    rig.clock.now += 29.0
    assert rig.receiver.expire() == []
    rig.clock.now += 2.0
    assert rig.receiver.expire() == ["r1"]
    rig.assert_nothing_held()


def test_repeated_finish_and_repeated_end_say_what_happened(rig):
    sender = rig.sender()
    rig.start(sender)
    sender.finish("r1")
    with pytest.raises(TransferError, match="already ended \\(done\\)"):
        sender.finish("r1")
    with pytest.raises(LayerSequenceError, match="already completed"):
        rig.receiver.on_end("r1", 1)


def test_closing_a_connection_mid_transfer_frees_the_receiver(rig):
    sender = rig.sender()
    rig.start(sender)
    sender.send_layers("r1", 2)
    rig.connection.close()  # the prefill side went away
    assert rig.receiver.status("r1").state is ReceiveState.ABORTED
    assert rig.receiver.num_reserved_blocks == 0
    rig.clock.now += 31.0
    assert sender.expire() == ["r1"]  # and its own lease frees the prefill side
    rig.assert_nothing_held()


def test_expire_does_not_touch_a_transfer_waiting_for_its_ack(rig):
    import threading

    acked, release = threading.Event(), threading.Event()

    class SlowAck(RecordingConnection):
        def end(self, request_id, num_frames, timeout):
            acked.set()
            release.wait(5)

    sender = rig.sender(connection=SlowAck())
    rig.start(sender)
    waiter = threading.Thread(target=sender.finish, args=("r1",))
    waiter.start()
    acked.wait(5)
    rig.clock.now += 31.0
    assert sender.expire() == []  # the ack wait is bounded by the lease itself
    release.set()
    waiter.join(5)
    assert sender.state("r1") is SendState.DONE
