"""Property-based fuzzing of the frame decoder and the receiver: random bytes and mutated real
frames either decode or raise a TransferError, and never leak a block or touch other blocks."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kv_rig import RecordingConnection, make_rig

from kv_transfer.errors import FrameError, TransferError
from kv_transfer.frame import decode_header
from kv_transfer.transport import Frame

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_header_decoder(data):
    try:
        decode_header(data)
    except FrameError:
        pass


def _frames(codec: str):
    rig = make_rig()
    recorder = RecordingConnection()
    sender = rig.sender(codec, connection=recorder, max_frame_bytes=rig.layout.bytes_per_block_layer * 2)
    rig.start(sender, num_tokens=40)
    sender.send_all("r1")
    return [(f.header, f.payload.clone()) for f in recorder.frames]


_VALID = {codec: _frames(codec) for codec in ("none", "int4")}


@FUZZ
@given(
    codec=st.sampled_from(sorted(_VALID)),
    which=st.integers(0, 100),
    part=st.sampled_from(["header", "payload"]),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_mutated_frames_fail_cleanly(codec, which, part, edits, cut):
    rig = make_rig()
    rig.receiver.reserve("r1", 40)
    rig.receiver.reserve("bystander", 16)
    bystander_blocks = rig.dst[:, :, 3].clone()
    header, payload = _VALID[codec][which % len(_VALID[codec])]
    buf = bytearray(header) if part == "header" else payload.clone()
    for pos, value in edits:
        buf[pos % len(buf)] = value
    if cut is not None:
        buf = buf[: cut % (len(buf) + 1)]
    frame = Frame(bytes(buf), payload) if part == "header" else Frame(header, buf)
    try:
        rig.receiver.on_frame(frame)
    except TransferError:
        pass
    rig.receiver.abort("r1")  # whatever happened, the blocks come back
    assert rig.receiver.status("bystander").state.value == "receiving"
    assert torch.equal(rig.dst[:, :, 3], bystander_blocks)  # the bystander's block is untouched
    rig.receiver.abort("bystander")
    rig.assert_nothing_held_on_decode_side()
