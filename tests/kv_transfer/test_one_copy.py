"""The one-copy path over shared memory: a sender whose KV cache lives in a memfd segment shares
it once with the shm server, frames then name layers of it where they lie, and the receiver
copies the request's blocks straight out of the sender's cache (read-only mapping). Exact bytes,
blocks held until the ack, every geometry lie refused, and the ordinary staged path for caches
that are not shared."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.block_manager import BlockAllocator
from engine.kv_cache import shared_segment, shared_zeros
from kv_transfer.codecs import CodecSpec
from kv_transfer.errors import LayoutMismatchError
from kv_transfer.frame import decode_header
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender, Route
from kv_transfer.transport import Frame
from kv_transfer.transports.shm import ShmConnection, ShmServer

LAYERS, BLOCKS, BS, HEADS, DIM = 4, 12, 4, 3, 8
SHAPE = (LAYERS, 2, BLOCKS, BS, HEADS, DIM)
SRC_BLOCKS = [5, 6, 7, 2, 9]  # one run of three, then two loose blocks


def _layout(heads=(0, HEADS)) -> KVLayout:
    return KVLayout(LAYERS, BS, HEADS, DIM, "float32", "m", heads=heads)


@pytest.fixture
def shared_cache() -> torch.Tensor:
    cache = shared_zeros(SHAPE, torch.float32)
    cache.copy_(torch.randn(SHAPE))
    return cache


class Recording(ShmConnection):
    """Counts how each frame travelled."""

    def send(self, frame):
        header = decode_header(frame.header)
        self.kinds = [*getattr(self, "kinds", []), "ref" if header.by_reference else "staged"]
        super().send(frame)


def _receive(cache: torch.Tensor, heads=(0, HEADS), codec="none", route_heads=None):
    dst = torch.zeros(LAYERS, 2, BLOCKS, BS, heads[1] - heads[0], DIM)
    d_alloc, p_alloc = BlockAllocator(BLOCKS), BlockAllocator(BLOCKS)
    receiver = KVReceiver(dst, _layout(heads), d_alloc)
    server = ShmServer(receiver)
    connection = Recording(server.address)
    try:
        receiver.reserve("r", len(SRC_BLOCKS) * BS)
        sender = KVSender(cache, _layout(), p_alloc, CodecSpec(codec))
        held = p_alloc.allocate(BLOCKS)  # the sender's blocks: the test's SRC_BLOCKS among them
        p_alloc.free([b for b in held if b not in SRC_BLOCKS])
        to = connection if route_heads is None else [Route(connection, range(LAYERS), range(*route_heads))]
        sender.start("r", SRC_BLOCKS, to)
        sender.send_layers("r", 2)  # layer by layer, as prefill computes
        assert p_alloc.num_free_blocks == BLOCKS - len(SRC_BLOCKS)  # held until the ack
        sender.finish("r")
        assert p_alloc.num_free_blocks == BLOCKS
        return dst, receiver.take("r"), connection.kinds
    finally:
        connection.close()
        server.close()


def test_a_shared_cache_is_read_in_place_exactly(shared_cache):
    dst, blocks, kinds = _receive(shared_cache)
    assert kinds == ["ref", "ref"]  # layers 0-1, then 2-3: no payload bytes staged
    assert torch.equal(dst[:, :, blocks], shared_cache[:, :, SRC_BLOCKS])
    assert not dst[:, :, [b for b in range(BLOCKS) if b not in blocks]].any()


def test_a_decode_rank_holding_some_heads_copies_only_those(shared_cache):
    dst, blocks, kinds = _receive(shared_cache, heads=(1, 3), route_heads=(1, 3))
    assert kinds == ["ref", "ref"]
    assert torch.equal(dst[:, :, blocks], shared_cache[:, :, SRC_BLOCKS, :, 1:3])


def test_caches_not_shared_and_quantized_frames_are_staged(shared_cache):
    plain = shared_cache.clone()  # ordinary memory
    assert shared_segment(plain) is None and shared_segment(shared_cache[1:3]) is not None
    dst, blocks, kinds = _receive(plain)
    assert set(kinds) == {"staged"} and torch.equal(dst[:, :, blocks], plain[:, :, SRC_BLOCKS])
    _, _, kinds = _receive(shared_cache, codec="int8")  # a codec must run: the bytes change
    assert set(kinds) == {"staged"}


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        ({"src_blocks": BLOCKS + 1}, "names .* bytes of the sender's cache"),
        ({"block_ids": (5, 6, 7, 2, BLOCKS)}, "names blocks beyond the sender's"),
        ({"src_heads": (1, 3)}, "carries KV heads .* of a sender holding"),
    ],
)
def test_reference_frames_that_lie_about_the_senders_cache_are_refused(shared_cache, lie, message):
    d_alloc = BlockAllocator(BLOCKS)
    receiver = KVReceiver(torch.zeros(SHAPE), _layout(), d_alloc)
    receiver.reserve("r", len(SRC_BLOCKS) * BS)
    frames = []

    class Capture(ShmConnection):
        def __init__(self):  # no server: only the frames are wanted
            pass

        def by_reference(self, tensor):
            return True

        def send(self, frame):
            frames.append(frame)

    sender = KVSender(shared_cache, _layout(), None)
    sender.start("r", SRC_BLOCKS, Capture())
    sender.send_all("r")
    (frame,) = frames
    header = dataclasses.replace(decode_header(frame.header), **lie)
    with pytest.raises(LayoutMismatchError, match=message):
        receiver.on_frame(Frame(header.encode(), frame.payload))
    assert d_alloc.num_free_blocks == BLOCKS  # the transfer failed and let its blocks go
