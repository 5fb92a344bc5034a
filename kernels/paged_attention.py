"""Paged attention in plain torch: the CPU path of the engine and the oracle for the Triton kernels.

A layer's cache is two tensors `k_cache`, `v_cache` of shape [num_blocks, block_size, num_kv_heads,
head_dim] (see engine/kv_cache.py for the full layout). A sequence's token at position `p` lives in
slot `block_table[p // block_size] * block_size + p % block_size` of the flattened
[num_blocks * block_size, num_kv_heads, head_dim] view; reads gather whole blocks, so gathered
position `p` of a sequence is exactly its token `p`.
"""

from __future__ import annotations

import itertools
from collections import Counter

import torch
import torch.nn.functional as F


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write new keys/values into their slots.  k, v: [T, KVH, D]; slot_mapping: [T] int64."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Whole blocks of one layer's K or V, back to back: [..., nb] ids -> [..., nb * block_size, KVH, D].

    Copying whole contiguous blocks (index_select) is several times cheaper than gathering token slots.
    """
    _, block_size, num_kv_heads, head_dim = cache.shape
    out = cache.index_select(0, block_ids.reshape(-1))
    return out.view(*block_ids.shape[:-1], block_ids.shape[-1] * block_size, num_kv_heads, head_dim)


def context_mask(context_lens: torch.Tensor, num_positions: int) -> torch.Tensor:
    """[B, num_positions] bool: which gathered positions hold a sequence's real context."""
    pos = torch.arange(num_positions, device=context_lens.device)
    return pos[None, :] < context_lens[:, None]


# What one more call of `decode_attention` costs, in attended positions: about 40 us per layer of
# fixed cost against 0.3-0.4 us per position on one CPU core (the embedded model's shapes).
GROUP_COST_POSITIONS = 128


def group_by_length(widths: list[int], group_cost: float = GROUP_COST_POSITIONS) -> list[list[int]]:
    """Split decode rows into groups attended separately, each padded to its own longest context.

    `widths[i]` is row i's padded context (positions). One padded call attends len(rows) x max(width)
    positions; a batch mixing one long context with many short ones would pay for the long one in
    every row. Minimises the sum over groups of `group_cost + len(group) * max width` exactly: the
    best groups are runs of the rows sorted by width, found by dynamic programming over the distinct
    widths. Returns row indices, each group in ascending row order.
    """
    order = sorted(range(len(widths)), key=widths.__getitem__)
    counts = Counter(widths)
    distinct = sorted(counts)
    ends = list(itertools.accumulate(counts[w] for w in distinct))  # rows up to each distinct width
    # best[j]: cheapest split of the rows up to distinct width j-1; cut[j]: where its last group starts
    best, cut = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        for i in range(j):
            cost = best[i] + group_cost + (ends[j - 1] - (ends[i - 1] if i else 0)) * distinct[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(distinct)
    while j:
        i = cut[j]
        groups.append(sorted(order[(ends[i - 1] if i else 0) : ends[j - 1]]))
        j = i
    return groups[::-1]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its paged context.

    q: [B, H, D]; block_tables: [B, nb] (padding entries may hold any valid block id);
    valid: [B, nb * block_size] from `context_mask`.  Returns [B, H, D].
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = gather_blocks(k_cache, block_tables).transpose(1, 2)  # [B, KVH, L, D]
    v = gather_blocks(v_cache, block_tables).transpose(1, 2)
    # The query heads sharing a KV head become the query rows of that head: no KV repetition.
    qg = q.view(batch, num_kv_heads, group, head_dim).to(k.dtype)  # [B, KVH, G, D]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention from block tables and context lengths (the Triton kernel's contract)."""
    valid = context_mask(context_lens, block_tables.shape[1] * k_cache.shape[1])
    return decode_attention(q, k_cache, v_cache, block_tables, valid, scale)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    num_prefix: int = 0,
) -> torch.Tensor:
    """Causal attention of one sequence's chunk.  q: [n, H, D]; k, v: [num_prefix + n, KVH, D].

    Query i sits at position num_prefix + i and sees keys 0..num_prefix + i.
    """
    n, ctx = q.shape[0], k.shape[0]
    # 4-D [1, heads, T, D]: with 3-D inputs torch falls back to its O(T^2)-memory math kernel.
    qt = q.transpose(0, 1)[None]
    kt, vt = k.transpose(0, 1)[None].to(q.dtype), v.transpose(0, 1)[None].to(q.dtype)
    if num_prefix == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        rows = torch.arange(n, device=q.device)[:, None] + num_prefix
        mask = torch.arange(ctx, device=q.device)[None, :] <= rows  # [n, ctx]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
