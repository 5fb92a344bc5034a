"""Property-based fuzzing of the frame decoder and the receiver: random bytes, random header maps,
headers with fields that lie, and payloads mutated *with a valid checksum* (so they reach the
lossless stage and the codec decoders) either decode or raise a TransferError that fails the
transfer; no block ever leaks and no other request's blocks are touched."""

from __future__ import annotations

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kv_rig import RecordingConnection, make_rig

from kv_transfer.codecs import CodecSpec
from kv_transfer.errors import FrameError, TransferError
from kv_transfer.frame import PREFIX, decode_header, payload_checksum
from kv_transfer.receiver import ReceiveState
from kv_transfer.transport import Frame

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.lists(st.integers(-5, 2**40), max_size=6),
)


def _frames(spec: CodecSpec) -> list[tuple[dict, torch.Tensor]]:
    rig = make_rig()
    recorder = RecordingConnection()
    sender = rig.sender(spec, connection=recorder, max_frame_bytes=rig.layout.bytes_per_block_layer * 2)
    rig.start(sender, num_tokens=40)
    sender.send_all("r1")
    return [(msgpack.unpackb(f.header[PREFIX.size :]), f.payload.clone()) for f in recorder.frames]


_VALID = {
    spec: _frames(spec)
    for spec in (CodecSpec("none"), CodecSpec("int4"), CodecSpec("fp8", "zstd"), CodecSpec("int8", "lz4"))
}


def _encode(header: dict) -> bytes:
    body = msgpack.packb(header)
    return PREFIX.pack(b"PDKV", len(body)) + body


@FUZZ
@given(st.binary(max_size=300))
def test_random_header_bytes_never_crash_the_decoder(body):
    try:
        decode_header(PREFIX.pack(b"PDKV", len(body)) + body)
    except FrameError:
        pass


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["v", "req", "fp", "layers", "blocks", "plen", "csum", "x"]), ANY_VALUE)
)
def test_random_header_maps_never_crash_the_decoder(fields):
    header, _ = _VALID[CodecSpec("none")][0]
    try:
        decode_header(_encode({**header, **fields}))
    except FrameError:
        pass


def _feed(header: dict, payload: torch.Tensor) -> None:
    """Give one frame to a fresh receiver holding r1 (3 blocks) and a bystander; check the outcome."""
    rig = make_rig()
    rig.receiver.reserve("r1", 40)
    rig.receiver.reserve("bystander", 16)
    bystander_block = rig.dst[:, :, 3].clone()
    try:
        rig.receiver.on_frame(Frame(_encode(header), payload))
    except TransferError:
        outcome = rig.receiver.status("r1")
        assert outcome.state in (ReceiveState.FAILED, ReceiveState.RECEIVING)  # RECEIVING: not r1's frame
    assert rig.receiver.status("bystander").state is ReceiveState.RECEIVING
    assert torch.equal(rig.dst[:, :, 3], bystander_block)
    rig.receiver.abort("r1")
    rig.receiver.abort("bystander")
    rig.assert_nothing_held_on_decode_side()


@FUZZ
@given(
    spec=st.sampled_from(sorted(_VALID, key=repr)),
    which=st.integers(0, 100),
    lies=st.dictionaries(
        st.sampled_from(["layers", "blocks", "first", "raw", "plen", "codec", "lossless", "bs", "scales"]),
        ANY_VALUE,
        min_size=1,
        max_size=3,
    ),
)
def test_headers_that_lie_fail_cleanly(spec, which, lies):
    header, payload = _VALID[spec][which % len(_VALID[spec])]
    _feed({**header, **lies}, payload)


@FUZZ
@given(
    spec=st.sampled_from(sorted(_VALID, key=repr)),
    which=st.integers(0, 100),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_mutated_payloads_with_valid_checksums_fail_cleanly(spec, which, edits, cut):
    header, payload = _VALID[spec][which % len(_VALID[spec])]
    payload = payload.clone()
    for pos, value in edits:
        payload[pos % payload.numel()] = value
    if cut is not None:
        payload = payload[: cut % (payload.numel() + 1)].clone()
    # A correct length and checksum: the mutation reaches the lossless stage and the decoder.
    header = {**header, "plen": payload.numel(), "csum": payload_checksum(payload, "xxh3_64")}
    _feed(header, payload)
