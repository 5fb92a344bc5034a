"""The attention layer over the paged KV cache: store the step's new K/V, then attend."""

from __future__ import annotations

import torch
from torch import nn

from engine.forward_context import PagedBatch, get_attention_metadata
from kernels import paged_attention as ref
from kernels import paged_attention_triton as triton_kernels
from kernels.paged_attention import decode_attention, gather_blocks, prefill_attention


class PagedAttention(nn.Module):
    """Holds no weights; `k_cache`/`v_cache` are bound by the model runner when it allocates the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, KVH, D]
        self.v_cache: torch.Tensor | None = None
        self.layer_idx = 0  # set with the caches

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] -> [T, H, D]
        meta = get_attention_metadata()
        kernels = triton_kernels if triton_kernels.available(q.device) else ref
        kernels.store_kv(self.k_cache, self.v_cache, meta.slot_mapping, k, v)
        if meta.on_layer_stored is not None:
            meta.on_layer_stored(self.layer_idx)
        if meta.paged is not None:
            return self._paged(q, meta.paged, meta.num_decodes)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        for group in meta.decode_groups:
            rows = q[:nd] if group.rows is None else q.index_select(0, group.rows)
            res = decode_attention(
                rows, self.k_cache, self.v_cache, group.block_tables, group.valid, self.scale
            )
            if group.rows is None:
                out[:nd] = res
            else:
                out.index_copy_(0, group.rows, res)
        for seg in meta.prefills:
            if seg.context_blocks is None:
                ks, vs = k[seg.start : seg.end], v[seg.start : seg.end]
            else:
                ctx = seg.num_prefix + seg.end - seg.start
                ks = gather_blocks(self.k_cache, seg.context_blocks)[:ctx]
                vs = gather_blocks(self.v_cache, seg.context_blocks)[:ctx]
            out[seg.start : seg.end] = prefill_attention(
                q[seg.start : seg.end], ks, vs, self.scale, seg.num_prefix
            )
        return out

    def _paged(self, q: torch.Tensor, batch: PagedBatch, num_decodes: int) -> torch.Tensor:
        """Every decode row in one call, every prefill chunk in another, through the block tables:
        the Triton kernels on CUDA, their torch references elsewhere."""
        on_gpu = triton_kernels.available(q.device)
        decode = triton_kernels.paged_decode_attention if on_gpu else ref.paged_decode_attention_ref
        q = q.contiguous()
        if batch.prefill_starts.shape[0] == 0:  # decode only (every captured CUDA graph)
            return decode(q, self.k_cache, self.v_cache, batch.decode_tables, batch.decode_lens, self.scale)
        if on_gpu:
            out = triton_kernels.paged_prefill_attention(
                q, self.k_cache, self.v_cache, batch.prefill_tables, batch.prefill_starts,
                batch.prefill_lens, batch.prefill_prefixes, batch.max_prefill_len, self.scale,
            )  # fmt: skip
        else:
            out = ref.paged_prefill_attention_ref(
                q, self.k_cache, self.v_cache, batch.prefill_tables, batch.prefill_starts,
                batch.prefill_lens, batch.prefill_prefixes, self.scale,
            )  # fmt: skip
        if num_decodes:
            rows = q[:num_decodes]
            out[:num_decodes] = decode(
                rows, self.k_cache, self.v_cache, batch.decode_tables, batch.decode_lens, self.scale
            )
        return out
