"""KV re-sharding between instance layouts: for every prefill (tp, pp) and decode (tp, pp) the
embedded model's shape allows, each decode rank receives exactly its layers and KV heads, once,
from the prefill ranks that hold them, and the cache it ends with is a single-process transfer's."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.errors import InvalidConfigError
from kv_transfer.resharding import ShardLayout, pieces_for, reshard_plan

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
