"""The plain-torch paged attention against dense causal attention over the same keys and values."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kernels.paged_attention import (
    gather_blocks,
    group_by_length,
    paged_decode_attention_ref,
    prefill_attention,
    store_kv,
)


def dense_attention(q, k, v, scale):
    # q: [n, H, D] at the last n positions of k, v: [L, KVH, D]; causal.
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    n, L = q.shape[0], k.shape[0]
    mask = torch.arange(L)[None, :] <= torch.arange(L - n, L)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (9, 3)])
def test_decode_attention_over_scattered_blocks(num_heads, num_kv_heads):
    torch.manual_seed(0)
    block_size, head_dim, num_blocks = 16, 32, 40
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    lens = [1, 17, 100, 64]
    perm = torch.randperm(num_blocks).tolist()
    tables, start = [], 0
    for n in lens:
        nb = -(-n // block_size)
        tables.append(perm[start : start + nb] + [0] * (8 - nb))
        start += nb
    block_tables, context_lens = torch.tensor(tables), torch.tensor(lens)
    q = torch.randn(len(lens), num_heads, head_dim)
    out = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, head_dim**-0.5)
    for i, n in enumerate(lens):
        k = gather_blocks(k_cache, block_tables[i])[:n]
        v = gather_blocks(v_cache, block_tables[i])[:n]
        ref = dense_attention(q[i : i + 1], k, v, head_dim**-0.5)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_store_kv_writes_exact_slots():
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros(4, 2, 1, 3)
    k = torch.arange(9.0).view(3, 1, 3)
    store_kv(k_cache, v_cache, torch.tensor([7, 0, 3]), k, -k)
    flat = k_cache.view(-1, 1, 3)
    assert torch.equal(flat[7], k[0]) and torch.equal(flat[0], k[1]) and torch.equal(flat[3], k[2])
    assert torch.equal(v_cache.view(-1, 1, 3)[3], -k[2])
    assert (k_cache != 0).any(-1).flatten().nonzero().flatten().tolist() == [0, 3, 7]  # nothing else written


@pytest.mark.parametrize("num_prefix", [0, 5, 31])
def test_prefill_attention_with_prefix(num_prefix):
    torch.manual_seed(1)
    n, heads, kv_heads, dim = 11, 6, 2, 16
    q = torch.randn(n, heads, dim)
    k = torch.randn(num_prefix + n, kv_heads, dim)
    v = torch.randn(num_prefix + n, kv_heads, dim)
    out = prefill_attention(q, k, v, dim**-0.5, num_prefix)
    torch.testing.assert_close(out, dense_attention(q, k, v, dim**-0.5), atol=1e-5, rtol=1e-5)


def _cost(groups, widths, group_cost):
    return sum(group_cost + len(g) * max(widths[r] for r in g) for g in groups)


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


@pytest.mark.parametrize("seed", range(6))
def test_group_by_length_is_the_cheapest_partition(seed):
    rng = random.Random(seed)
    widths = [16 * rng.choice([1, 2, 3, 8, 9, 40, 64]) for _ in range(rng.randrange(1, 8))]
    groups = group_by_length(widths, group_cost=128)
    assert sorted(itertools.chain(*groups)) == list(range(len(widths)))  # a partition of the rows
    assert all(g == sorted(g) for g in groups)
    brute = min(_cost(p, widths, 128) for p in _partitions(list(range(len(widths)))))
    assert _cost(groups, widths, 128) == brute


def test_group_by_length_splits_a_long_context_from_short_ones_only_when_it_pays():
    assert group_by_length([16] * 12) == [list(range(12))]
    assert group_by_length([16, 32, 16, 1024, 48]) == [[0, 1, 2, 4], [3]]  # 5 x 1024 would be padding
    assert group_by_length([512, 528], group_cost=128) == [[0, 1]]  # a group costs more than 16 positions
