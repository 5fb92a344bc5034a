"""Per-step attention metadata, reachable from the attention layers without threading it through
every module's forward (so models keep `forward(input_ids, positions)`).

The flat batch of a step holds every scheduled sequence's new tokens back to back: first the
decode rows (one token each), then the prefill chunks (several tokens each)::

    tokens:  | d0 | d1 | ... | d(B-1) | p0 chunk ........ | p1 chunk .... |
    slots:     where each token's K/V is written (block * block_size + offset)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillSegment:
    start: int  # first row of this chunk in the flat batch
    end: int  # one past its last row
    num_prefix: int  # tokens of this sequence already in the cache before the chunk
    context_blocks: torch.Tensor | None  # [nb] blocks holding prefix + chunk; None when num_prefix == 0


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows of similar context length, attended together with their block tables padded to
    the longest of them (so a step's padding is bounded by the group, not the whole batch)."""

    rows: torch.Tensor | None  # [n] int64 rows of the flat batch; None: rows [0, num_decodes) in order
    block_tables: torch.Tensor  # [n, nb] padded block tables
    valid: torch.Tensor  # [n, nb * block_size] bool: real context positions


@dataclass(frozen=True)
class PagedBatch:
    """The step for the paged kernels (kernels/paged_attention_triton.py): one call per phase, every
    sequence read through its block table. Block tables are int32, padded with block 0."""

    decode_tables: torch.Tensor  # [num_decodes, nb]
    decode_lens: torch.Tensor  # [num_decodes] context length including the new token; 0: a padded row
    prefill_tables: torch.Tensor  # [num_prefills, nb]
    prefill_starts: torch.Tensor  # [num_prefills] first row of each chunk in the flat batch
    prefill_lens: torch.Tensor  # [num_prefills] tokens of each chunk
    prefill_prefixes: torch.Tensor  # [num_prefills] tokens already cached before each chunk
    max_prefill_len: int  # the longest chunk (sizes the prefill launch without reading the device)


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64; -1: a padded row whose K/V are not stored
    num_decodes: int  # rows [0, num_decodes) are decode tokens
    decode_groups: tuple[DecodeGroup, ...]  # a partition of the decode rows (the grouped path)
    prefills: tuple[PrefillSegment, ...]  # (the grouped path)
    paged: PagedBatch | None = None  # set: the paged path, and the two fields above are empty
    # Called with the layer index once that layer's new K/V are in the cache (before it attends):
    # a prefill worker streams each finished layer to decode while later layers compute.
    on_layer_stored: Callable[[int], None] | None = None


# Per thread: a worker steps its engine on its own loop thread, beside other threads' engines.
_local = threading.local()


def get_attention_metadata() -> AttentionMetadata:
    current = getattr(_local, "current", None)
    if current is None:
        raise RuntimeError("attention layers ran outside of a forward context")
    return current


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    previous = getattr(_local, "current", None)
    _local.current = metadata
    try:
        yield
    finally:
        _local.current = previous
