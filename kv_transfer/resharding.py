"""KV transfer between instances of different layouts: which pieces of a request's KV each prefill
rank sends to each decode rank, so every decode rank receives exactly the layers and KV heads it
owns, straight from the ranks that hold them (no rank gathers the whole cache).

A rank of an instance with tensor parallel `tp` and pipeline parallel `pp` (rank = stage * tp +
TP rank, engine/parallel) owns a rectangle of the model's KV: its stage's layers times its TP
rank's KV heads, both contiguous ranges (engine.parallel's `split_range`). A transfer from layout
A to layout B is the list of non-empty intersections of A's rectangles with B's:

    prefill tp=2 pp=1 (3 KV heads: 2 + 1)        decode tp=1 pp=2 (30 layers: 15 + 15)
    rank 0: layers 0-29, heads 0-1   ──────►  rank 0: layers 0-14, heads 0-2  (pieces from 0 and 1)
    rank 1: layers 0-29, head  2     ──────►  rank 1: layers 15-29, heads 0-2 (pieces from 0 and 1)

The pieces of one decode rank tile its rectangle exactly once, whatever the two layouts: each
piece travels as frames of its own from the prefill rank holding it to the decode rank owning it
(kv_transfer/rank_kv.py), cut from the sender's cache and written into the receiver's in their
own layer and head numbering; `Piece.take` / `Piece.put` do the same on tensors, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from engine.errors import InvalidConfigError
from engine.model_config import ModelConfig
from engine.parallel.tensor_parallel import split_range


def _intersect(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop))


@dataclass(frozen=True)
class ShardLayout:
    """How one instance splits a model's KV: `tp` ways over KV heads, `pp` stages over layers."""

    num_layers: int
    num_kv_heads: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.tp <= self.num_kv_heads:
            raise InvalidConfigError(
                f"tp={self.tp} must be between 1 and the model's {self.num_kv_heads} KV heads"
            )
        if not 1 <= self.pp <= self.num_layers:
            raise InvalidConfigError(
                f"pp={self.pp} must be between 1 and the model's {self.num_layers} layers"
            )

    @classmethod
    def of(cls, model: ModelConfig, tp: int = 1, pp: int = 1) -> ShardLayout:
        return cls(model.num_layers, model.num_kv_heads, tp, pp)

    @property
    def num_ranks(self) -> int:
        return self.tp * self.pp

    def layers(self, rank: int) -> range:
        return split_range(self.num_layers, self.pp, rank // self.tp)

    def heads(self, rank: int) -> range:
        return split_range(self.num_kv_heads, self.tp, rank % self.tp)


@dataclass(frozen=True)
class Piece:
    """The part of a request's KV that rank `src` of the sending layout sends to rank `dst` of the
    receiving one: `layers` x `heads`, in the model's numbering."""

    src: int
    dst: int
    layers: range
    heads: range
    src_origin: tuple[int, int]  # (first layer, first KV head) the sender's cache holds
    dst_origin: tuple[int, int]  # the same for the receiver's cache

    @cached_property
    def _src_index(self) -> tuple[slice, slice]:
        return self._local(self.src_origin)

    def _local(self, origin: tuple[int, int]) -> tuple[slice, slice]:
        layer0, head0 = origin
        return (
            slice(self.layers.start - layer0, self.layers.stop - layer0),
            slice(self.heads.start - head0, self.heads.stop - head0),
        )

    def take(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The piece out of the sender's cache [layers, 2, blocks, block_size, kv_heads, head_dim]
        for the request's `blocks`: a new tensor [layers, 2, len(blocks), block_size, heads, head_dim]."""
        layers, heads = self._src_index
        return cache[layers, :, :, :, heads].index_select(2, blocks)

    def put(self, cache: torch.Tensor, blocks: torch.Tensor, piece: torch.Tensor) -> None:
        """Write `piece` (from `take`) into the receiver's cache at its own `blocks`."""
        layers, heads = self._local(self.dst_origin)
        view = cache[layers, :, :, :, heads]  # a view: basic indexing only
        view.index_copy_(2, blocks, piece.to(view.dtype))


def reshard_plan(src: ShardLayout, dst: ShardLayout) -> list[Piece]:
    """Every non-empty piece from a `src`-layout instance to a `dst`-layout one, by (src, dst)."""
    if (src.num_layers, src.num_kv_heads) != (dst.num_layers, dst.num_kv_heads):
        raise InvalidConfigError(
            f"the two layouts are of different models: {src.num_layers} layers x {src.num_kv_heads} "
            f"KV heads against {dst.num_layers} x {dst.num_kv_heads}"
        )
    pieces = []
    for s in range(src.num_ranks):
        for d in range(dst.num_ranks):
            layers = _intersect(src.layers(s), dst.layers(d))
            heads = _intersect(src.heads(s), dst.heads(d))
            if len(layers) and len(heads):
                origins = [(lay.layers(r).start, lay.heads(r).start) for lay, r in ((src, s), (dst, d))]
                pieces.append(Piece(s, d, layers, heads, *origins))
    return pieces


def pieces_for(plan: list[Piece], dst: int) -> list[Piece]:
    """What decode rank `dst` waits for before its part of the request is complete."""
    return [p for p in plan if p.dst == dst]


def pieces_from(plan: list[Piece], src: int) -> list[Piece]:
    """What prefill rank `src` sends."""
    return [p for p in plan if p.src == src]


@dataclass(frozen=True)
class KVDestination:
    """Where a request's KV goes: a decode instance laid out `tp` x `pp`, whose rank r listens
    for transport `kind` at `addresses[r]`."""

    kind: str
    addresses: tuple[str, ...]
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if len(self.addresses) != self.tp * self.pp:
            raise InvalidConfigError(
                f"a tp={self.tp} x pp={self.pp} decode instance has {self.tp * self.pp} ranks to "
                f"send to; {len(self.addresses)} addresses given"
            )

    def endpoint(self, rank: int) -> tuple[str, str]:
        return self.kind, self.addresses[rank]

    def layout(self, model_layers: int, model_kv_heads: int) -> ShardLayout:
        return ShardLayout(model_layers, model_kv_heads, self.tp, self.pp)
