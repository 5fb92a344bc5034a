"""Tensor parallelism applied from outside the model, as gpt-fast does: the Llama model file stays
single-device. Rank r of N builds that same model from a config holding only its heads and its
slice of the MLP, keeps only its slice of each checkpoint tensor as the loader streams them (one
tensor in memory at a time, never the whole model), and sums the partial outputs of the two
row-parallel projections with one all-reduce each.

Per decoder layer, rank r of N:

    qkv_proj   rows of its query heads, of its KV heads' K and of their V   column-parallel
    o_proj     columns of its query heads                                   row-parallel: all-reduce
    gate_up    rows of its range of intermediate features (gate and up)     column-parallel
    down_proj  columns of the same range                                    row-parallel: all-reduce
    embedding, norms, lm_head: whole on every rank (the hidden state is whole after each all-reduce)

KV heads go to ranks in contiguous ranges as even as the count allows, each with its group of
query heads, so any degree up to the number of KV heads works: the embedded model's 3 KV heads
over TP=2 are 2 and 1. Each rank's KV cache holds only its KV heads (the cache layout is the
engine's, with a smaller head count), which is what a KV transfer between different layouts
re-shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import InvalidConfigError
from engine.model_config import ModelConfig


def split_range(total: int, parts: int, index: int) -> range:
    """The `index`-th of `parts` contiguous ranges covering [0, total), sizes differing by at most 1."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


@dataclass(frozen=True)
class TPShard:
    """What rank `rank` of a `size`-way tensor-parallel group owns of a model."""

    model: ModelConfig  # the whole model's config
    rank: int
    size: int

    def __post_init__(self) -> None:
        if not 1 <= self.size <= self.model.num_kv_heads:
            raise InvalidConfigError(
                f"tensor_parallel_size {self.size} must be between 1 and the model's number of KV "
                f"heads ({self.model.num_kv_heads}): each rank owns at least one KV head"
            )
        if self.size > self.model.intermediate_size:
            raise InvalidConfigError(f"tensor_parallel_size {self.size} exceeds the MLP width")
        if not 0 <= self.rank < self.size:
            raise InvalidConfigError(f"rank {self.rank} is outside a group of {self.size}")

    @cached_property
    def kv_heads(self) -> range:
        return split_range(self.model.num_kv_heads, self.size, self.rank)

    @cached_property
    def q_heads(self) -> range:
        group = self.model.num_heads // self.model.num_kv_heads
        return range(self.kv_heads.start * group, self.kv_heads.stop * group)

    @cached_property
    def ffn(self) -> range:
        return split_range(self.model.intermediate_size, self.size, self.rank)

    @cached_property
    def config(self) -> ModelConfig:
        """The single-device model this rank builds: its heads and MLP slice, the rest whole."""
        return self.model.replace(
            num_heads=len(self.q_heads), num_kv_heads=len(self.kv_heads), intermediate_size=len(self.ffn)
        )

    @property
    def largest(self) -> ModelConfig:
        """The config of the rank holding the most KV heads (rank 0): every rank sizes its cache by
        it, so all ranks have the same number of blocks."""
        return TPShard(self.model, 0, self.size).config

    def _rows(self, heads: range) -> tuple[int, int]:
        d = self.model.head_dim
        return heads.start * d, len(heads) * d

    def slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the Hugging Face-named checkpoint tensor `name` (a view)."""
        if self.size == 1:
            return tensor
        part = name.rsplit(".", 2)[-2] if "." in name else name
        if part == "q_proj":
            return tensor.narrow(0, *self._rows(self.q_heads))
        if part in ("k_proj", "v_proj"):
            return tensor.narrow(0, *self._rows(self.kv_heads))
        if part == "o_proj":
            return tensor.narrow(-1, *self._rows(self.q_heads))
        if part in ("gate_proj", "up_proj"):
            return tensor.narrow(0, self.ffn.start, len(self.ffn))
        if part == "down_proj":
            return tensor.narrow(-1, self.ffn.start, len(self.ffn))
        return tensor  # embeddings, norms, lm_head: whole

    def weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The loader's stream with every tensor cut to this rank's part."""
        for name, tensor in weights:
            yield name, self.slice(name, tensor)


class AllReduce(nn.Module):
    """A row-parallel layer: the wrapped projection's partial output, summed over the group."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x).contiguous()
        self.group.allreduce([out]).wait()  # the group object itself: no global default group
        return out


def apply_tensor_parallel(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Make a Llama model built from a TPShard's config sum its row-parallel outputs over `group`.
    The only change to the model: o_proj and down_proj are wrapped."""
    for layer in model.model.layers:
        layer.self_attn.o_proj = AllReduce(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = AllReduce(layer.mlp.down_proj, group)
    return model
