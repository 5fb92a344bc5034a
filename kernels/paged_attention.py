"""Paged attention in plain torch: the CPU path of the engine and the oracle for the Triton kernels.

A layer's cache is two tensors `k_cache`, `v_cache` of shape [num_blocks, block_size, num_kv_heads,
head_dim] (see engine/kv_cache.py for the full layout). A sequence's token at position `p` lives in
slot `block_table[p // block_size] * block_size + p % block_size` of the flattened
[num_blocks * block_size, num_kv_heads, head_dim] view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write new keys/values into their slots.  k, v: [T, KVH, D]; slot_mapping: [T] int64."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def context_slots(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat slot of every context position, and which positions are real.

    block_tables: [B, max_blocks] int64 (padding entries may hold any valid block id);
    context_lens: [B].  Returns slots [B, L] and valid [B, L] with L = max(context_lens).
    """
    max_len = int(context_lens.max())
    pos = torch.arange(max_len, device=block_tables.device)
    blocks = block_tables[:, pos // block_size]  # [B, L]
    slots = blocks * block_size + pos % block_size
    valid = pos[None, :] < context_lens[:, None]
    return slots, valid


def decode_attention_from_slots(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its paged context.  q: [B, H, D] -> [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(1, 2)  # [B, KVH, L, D]
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots].transpose(1, 2)
    # The query heads sharing a KV head become the query rows of that head: no KV repetition.
    qg = q.view(batch, num_kv_heads, group, head_dim).to(k.dtype)  # [B, KVH, G, D]
    mask = valid[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention straight from block tables (the Triton kernel's contract)."""
    slots, valid = context_slots(block_tables, context_lens, k_cache.shape[1])
    return decode_attention_from_slots(q, k_cache, v_cache, slots, valid, scale)


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
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)
    if num_prefix == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        rows = torch.arange(n, device=q.device)[:, None] + num_prefix
        mask = torch.arange(ctx, device=q.device)[None, :] <= rows  # [n, ctx]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
