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

# A quantized cache's codes (fp8 e4m3 or int8) and their largest magnitude; such a cache carries one
# float32 scale per slot and head, `k_scale`, `v_scale` [num_blocks, block_size, KVH]: value = code * scale.
KV_CACHE_QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
TINY = 1e-12  # floor for scales, so an all-zero row quantizes to zeros


def quantize_kv_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, KVH, D] -> codes [T, KVH, D] of `dtype` and scales [T, KVH] (float32): absmax / qmax per
    (token, head), so a token stored later never rescales the ones before it."""
    qmax = KV_CACHE_QMAX[dtype]
    x = x.float()
    scale = x.abs().amax(-1).clamp_min(TINY) / qmax
    y = x / scale[..., None]
    codes = y.to(dtype) if dtype == torch.float8_e4m3fn else torch.floor(y + 0.5).clamp(-qmax, qmax).to(dtype)
    return codes, scale


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A layer's K or V cache as values: float32 from codes and scales, or the cache itself."""
    if scale is None:
        return cache
    return cache.float() * scale[..., None]


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write new keys/values into their slots.  k, v: [T, KVH, D]; slot_mapping: [T] int64, where -1
    marks a padded row that writes nothing. A quantized cache (with scales) gets codes and scales."""
    if k_cache.device.type == "cpu" and bool((slot_mapping < 0).any()):  # the Triton kernel skips them
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        if scales is not None:
            x, row_scales = quantize_kv_rows(x, cache.dtype)
            scales.view(-1, scales.shape[-1]).index_copy_(0, slot_mapping, row_scales)
        x = x.to(cache.dtype)
        if cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 kernel: copy the bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, x)


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention from block tables and context lengths (the Triton kernel's contract); a row
    of length 0 (padding) gives zeros."""
    k_cache, v_cache = dequantize_kv(k_cache, k_scale), dequantize_kv(v_cache, v_scale)
    valid = context_mask(context_lens, block_tables.shape[1] * k_cache.shape[1])
    out = decode_attention(q, k_cache, v_cache, block_tables, valid, scale)
    return out.masked_fill((context_lens == 0)[:, None, None], 0.0)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    prefixes: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunk c (rows starts[c] .. + lens[c] of q [T, H, D]) attends its sequence's positions
    0 .. prefixes[c] + i causally, all read from the cache through block_tables[c] (the chunk's own
    K/V already stored). Rows outside every chunk are zeros."""
    k_cache, v_cache = dequantize_kv(k_cache, k_scale), dequantize_kv(v_cache, v_scale)
    out = torch.zeros_like(q)
    for table, start, n, prefix in zip(
        block_tables, starts.tolist(), lens.tolist(), prefixes.tolist(), strict=True
    ):
        ctx = prefix + n
        nb = -(-ctx // k_cache.shape[1])
        ks = gather_blocks(k_cache, table[:nb])[:ctx]
        vs = gather_blocks(v_cache, table[:nb])[:ctx]
        out[start : start + n] = prefill_attention(q[start : start + n], ks, vs, scale, prefix).to(q.dtype)
    return out


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
