"""KV re-sharding between instance layouts: for every prefill (tp, pp) and decode (tp, pp) the
embedded model's shape allows, each decode rank receives exactly its layers and KV heads, once,
from the prefill ranks that hold them, and the cache it ends with is a single-process transfer's:
first as tensor pieces, then as real frames from one KVSender per prefill rank to one KVReceiver
per decode rank."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.block_manager import BlockAllocator
from engine.errors import InvalidConfigError
from kv_transfer.codecs import CodecSpec
from kv_transfer.connections import ConnectionPool
from kv_transfer.errors import LayerSequenceError, LayoutMismatchError
from kv_transfer.layout import KVLayout
from kv_transfer.rank_kv import num_sources, routes_for
from kv_transfer.receiver import KVReceiver, ReceiveState
from kv_transfer.resharding import KVDestination, ShardLayout, pieces_for, reshard_plan
from kv_transfer.sender import KVSender, Route
from kv_transfer.transports import connector
from kv_transfer.transports.local import LocalServer

LAYERS, KV_HEADS = 30, 3  # the embedded model's: 30 layers, 3 KV heads
DEGREES = [(tp, pp) for tp in (1, 2, 3) for pp in (1, 2, 3, 4)]
SRC_BLOCKS, DST_BLOCKS = [5, 1, 6], [0, 7, 2]  # a request's blocks differ on the two sides


def _shard(full: torch.Tensor, layout: ShardLayout, rank: int) -> torch.Tensor:
    layers, heads = layout.layers(rank), layout.heads(rank)
    return full[layers.start : layers.stop, :, :, :, heads.start : heads.stop].clone()


@pytest.mark.parametrize(("src_degrees", "dst_degrees"), list(itertools.product(DEGREES, DEGREES)))
def test_every_decode_rank_ends_with_exactly_its_part(src_degrees, dst_degrees):
    src = ShardLayout(LAYERS, KV_HEADS, *src_degrees)
    dst = ShardLayout(LAYERS, KV_HEADS, *dst_degrees)
    full = torch.randn(LAYERS, 2, 8, 4, KV_HEADS, 8)  # [layers, K/V, blocks, block_size, heads, dim]
    senders = [_shard(full, src, r) for r in range(src.num_ranks)]
    receivers = [torch.zeros_like(_shard(full, dst, r)) for r in range(dst.num_ranks)]
    plan = reshard_plan(src, dst)
    src_ids, dst_ids = torch.tensor(SRC_BLOCKS), torch.tensor(DST_BLOCKS)
    for piece in plan:
        piece.put(receivers[piece.dst], dst_ids, piece.take(senders[piece.src], src_ids))
    for rank, cache in enumerate(receivers):
        expected = _shard(full, dst, rank)[:, :, SRC_BLOCKS]
        assert torch.equal(cache[:, :, DST_BLOCKS], expected)
        others = [b for b in range(8) if b not in DST_BLOCKS]
        assert not cache[:, :, others].any()  # nothing written outside the request's blocks
        # its pieces tile its rectangle exactly once
        covered = torch.zeros(LAYERS, KV_HEADS, dtype=torch.int)
        for piece in pieces_for(plan, rank):
            covered[piece.layers.start : piece.layers.stop, piece.heads.start : piece.heads.stop] += 1
        layers, heads = dst.layers(rank), dst.heads(rank)
        mine = torch.zeros_like(covered)
        mine[layers.start : layers.stop, heads.start : heads.stop] = 1
        assert torch.equal(covered, mine)
    # no piece is empty and no rank pair appears twice
    assert all(len(p.layers) and len(p.heads) for p in plan)
    assert len({(p.src, p.dst) for p in plan}) == len(plan)


def test_equal_layouts_send_rank_to_rank():
    layout = ShardLayout(LAYERS, KV_HEADS, tp=2, pp=2)
    assert [(p.src, p.dst) for p in reshard_plan(layout, layout)] == [(r, r) for r in range(4)]


def test_the_example_in_the_module_doc():
    plan = reshard_plan(ShardLayout(LAYERS, KV_HEADS, tp=2), ShardLayout(LAYERS, KV_HEADS, pp=2))
    assert [(p.src, p.dst, p.layers, p.heads) for p in plan] == [
        (0, 0, range(0, 15), range(0, 2)),
        (0, 1, range(15, 30), range(0, 2)),
        (1, 0, range(0, 15), range(2, 3)),
        (1, 1, range(15, 30), range(2, 3)),
    ]


def test_layouts_the_model_cannot_take_are_refused():
    with pytest.raises(InvalidConfigError, match="tp=4 must be between 1 and the model's 3 KV heads"):
        ShardLayout(LAYERS, KV_HEADS, tp=4)
    with pytest.raises(InvalidConfigError, match="pp=31 must be between 1 and the model's 30 layers"):
        ShardLayout(LAYERS, KV_HEADS, pp=31)
    with pytest.raises(InvalidConfigError, match="layouts are of different models"):
        reshard_plan(ShardLayout(LAYERS, KV_HEADS), ShardLayout(32, 8))


# --- the same through real frames: KVSender routes, one KVReceiver per decode rank ----------------

BLOCK, DIM, NUM_BLOCKS = 4, 8, 8
FRAME_DEGREES = [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 3)]


def _layout(shard: ShardLayout, rank: int) -> KVLayout:
    layers, heads = shard.layers(rank), shard.heads(rank)
    return KVLayout(
        LAYERS, BLOCK, KV_HEADS, DIM, "float32", "m", (layers.start, layers.stop), (heads.start, heads.stop)
    )


def _transfer(src: ShardLayout, dst: ShardLayout, full: torch.Tensor, codec: str = "none", tamper=None):
    """One request's KV from `src`'s ranks (caches cut from `full`) to `dst`'s, every piece in frames
    of its own; returns the decode ranks' caches, their receivers and the senders."""
    num_tokens = len(SRC_BLOCKS) * BLOCK - 1  # the last block partly filled
    receivers, servers = [], []
    allocator = BlockAllocator(NUM_BLOCKS)  # rank 0's: it reserves for every rank
    blocks = None
    for rank in range(dst.num_ranks):
        cache = torch.zeros_like(_shard(full, dst, rank))
        receiver = KVReceiver(cache, _layout(dst, rank), allocator if rank == 0 else None)
        sources = num_sources(src, dst, rank)
        if rank == 0:
            blocks = receiver.reserve("r", num_tokens, sources=sources)
        else:
            receiver.adopt("r", num_tokens, blocks, sources=sources)
        receivers.append(receiver)
        servers.append(LocalServer(receiver))
    destination = KVDestination("local", tuple(s.address for s in servers), dst.tp, dst.pp)
    senders = []
    for rank in range(src.num_ranks):
        sender = KVSender(_shard(full, src, rank), _layout(src, rank), None, CodecSpec(codec))
        routes = routes_for(src, rank, destination, ConnectionPool(connector()))
        if tamper is not None:
            routes = tamper(rank, routes)
        sender.start("r", SRC_BLOCKS, routes)
        senders.append(sender)
    for sender in senders:
        sender.finish("r")
    return [r.cache for r in receivers], receivers, allocator


@pytest.mark.parametrize(
    ("src_degrees", "dst_degrees"), list(itertools.product(FRAME_DEGREES, FRAME_DEGREES))
)
def test_frames_carry_each_decode_rank_exactly_its_part(src_degrees, dst_degrees):
    src = ShardLayout(LAYERS, KV_HEADS, *src_degrees)
    dst = ShardLayout(LAYERS, KV_HEADS, *dst_degrees)
    full = torch.randn(LAYERS, 2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    caches, receivers, allocator = _transfer(src, dst, full)
    blocks = receivers[0].take("r")
    for rank, (cache, receiver) in enumerate(zip(caches, receivers, strict=True)):
        if rank:
            assert receiver.take("r") == blocks  # complete on every rank
        assert torch.equal(cache[:, :, blocks], _shard(full, dst, rank)[:, :, SRC_BLOCKS])
        others = [b for b in range(NUM_BLOCKS) if b not in blocks]
        assert not cache[:, :, others].any()
    allocator.free(blocks)
    assert allocator.num_free_blocks == NUM_BLOCKS


@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
def test_a_quantized_transfer_between_layouts_decodes_as_it_would_whole(codec):
    """Scales are per block and head (or token and head): cutting heads apart changes no byte."""
    full = torch.randn(LAYERS, 2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    whole = ShardLayout(LAYERS, KV_HEADS)
    (reference,), _, _ = _transfer(whole, whole, full, codec)
    dst = ShardLayout(LAYERS, KV_HEADS, tp=3, pp=2)
    caches, _, _ = _transfer(ShardLayout(LAYERS, KV_HEADS, tp=2, pp=3), dst, full, codec)
    for rank, cache in enumerate(caches):
        assert torch.equal(cache, _shard(reference, dst, rank))


def test_a_missing_piece_fails_the_rank_that_waits_for_it():
    src, dst = ShardLayout(LAYERS, KV_HEADS, tp=2), ShardLayout(LAYERS, KV_HEADS, pp=2)
    full = torch.randn(LAYERS, 2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM)

    def drop_heads(rank, routes):  # prefill rank 1 claims to send decode rank 1 nothing but ends
        if rank != 1:
            return routes
        return [routes[0]] + [
            type(r)(r.connection, range(r.layers.start, r.layers.start + 1), r.heads) for r in routes[1:]
        ]

    with pytest.raises(LayerSequenceError, match=r"ended with layers 16-29 incomplete"):
        _transfer(src, dst, full, tamper=drop_heads)


def test_a_frame_outside_the_ranks_rectangle_is_refused():
    src, dst = ShardLayout(LAYERS, KV_HEADS), ShardLayout(LAYERS, KV_HEADS, pp=2)
    full = torch.randn(LAYERS, 2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM)

    def misroute(rank, routes):  # layers 15-29 sent to decode rank 0, which holds 0-14
        return [Route(routes[0].connection, r.layers, r.heads) for r in routes]

    with pytest.raises(LayoutMismatchError, match=r"carries layers 15-29; this cache holds 0-14"):
        _transfer(src, dst, full, tamper=misroute)


def test_the_transfer_completes_only_at_the_last_senders_end():
    src, dst = ShardLayout(LAYERS, KV_HEADS, tp=3), ShardLayout(LAYERS, KV_HEADS)
    full = torch.randn(LAYERS, 2, NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    cache = torch.zeros_like(full)
    allocator = BlockAllocator(NUM_BLOCKS)
    receiver = KVReceiver(cache, _layout(dst, 0), allocator)
    receiver.reserve("r", len(SRC_BLOCKS) * BLOCK, sources=3)
    server = LocalServer(receiver)
    destination = KVDestination("local", (server.address,))
    senders = [KVSender(_shard(full, src, r), _layout(src, r), None) for r in range(3)]
    for rank, sender in enumerate(senders):
        sender.start("r", SRC_BLOCKS, routes_for(src, rank, destination, ConnectionPool(connector())))
    for rank, sender in enumerate(senders):
        sender.finish("r")
        done = rank == 2
        assert (receiver.status("r").state is ReceiveState.COMPLETE) == done
    blocks = receiver.take("r")
    assert torch.equal(cache[:, :, blocks], full[:, :, SRC_BLOCKS])
