"""Paged attention and the KV store in Triton: the GPU path of kernels/paged_attention.py, same cache
layout, same contracts, and that module's functions as the oracle.

A layer's cache is `k_cache`, `v_cache` [num_blocks, block_size, KVH, D]; token `p` of a sequence is
slot `table[p // block_size] * block_size + p % block_size`. A quantized cache (fp8 e4m3 or int8)
carries one float32 scale per slot and head beside it, `k_scale`, `v_scale` [num_blocks, block_size,
KVH]: value = code * scale. Per token, so appending a decode token never rescales a block.

Decode (flash-decoding): one query token per sequence; each program takes one (sequence, KV head,
split) and attends the split's stretch of context for all the query heads of that KV head at once,
so each K/V tile is loaded once for its whole GQA group:

    grid (B, KVH, S)     program (b, g, s): rows q[b, g*G : (g+1)*G]       [G, D]
        for each tile of BLOCK_N tokens in [s*L, min((s+1)*L, len[b])):
            pages -> slots -> K, V tiles [BLOCK_N, D] (dequantized when the cache is quantized)
            online softmax: running max m, sum l, accumulator acc [G, D]
        S == 1: out[b, heads] = acc / l
        S > 1:  partial acc / l and lse = m + log l per split, then one merge program per (b, head):
                out = sum_s exp(lse_s - max lse) * o_s / sum_s exp(lse_s - max lse)

S is fixed per launch, from the batch size and the block tables' width (never from the lengths on
the device), and each sequence cuts its own length into S stretches (L = its length / S, in whole
tiles), so a launch reads no device value on the host and can be captured in a CUDA graph. A row
whose length is 0 (a padded row of a captured batch) gets zeros.

Prefill: packed variable-length chunks, each query tile attending its sequence's cached prefix and the
chunk itself causally, all read through the block table (the chunk's K/V are stored before attention),
so a chunk after a prefix costs no gather copy:

    grid (num_chunks, H, max_tiles)   program (c, h, t): queries t*BLOCK_M .. of chunk c at positions
        prefix[c] + i, keys 0 .. prefix[c] + (t+1)*BLOCK_M - 1 through table[c]

Store: one program per new token writes all its heads' K and V into its slot (slot -1: skipped, for
padded rows), quantizing each (token, head) row with its own absmax scale for a quantized cache.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels import paged_attention
from kernels.kv_quant_triton import _e4m3_bits, _e4m3_value

# Quantized decode caches this module reads and writes, and their largest code (the reference's).
KV_CACHE_QMAX = paged_attention.KV_CACHE_QMAX
_TINY = tl.constexpr(paged_attention.TINY)
MIN_SPLIT_TOKENS = 128  # below this a split's fixed cost outweighs the parallelism it adds
DECODE_BLOCK_N = 64  # tokens per K/V tile in decode
PREFILL_BLOCK_M, PREFILL_BLOCK_N = 64, 64

# Reductions through their combine functions rather than tl.max / tl.sum, which are @triton.jit
# functions bound when triton is first imported: so an interpreted copy of this module made later
# (tests/kernels/test_paged_attention_triton.py) still runs (as in kernels/kv_quant_triton.py).
_max2 = tl.standard._elementwise_max
_add2 = tl.standard._sum_combine


@triton.jit
def _max(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _max2)


@triton.jit
def _sum(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _add2)


@triton.jit
def _kv_tile(
    cache,
    scales,
    slots,
    mask_n,
    kv_head,
    offs_d,
    mask_d,
    KVH: tl.constexpr,
    D: tl.constexpr,
    QUANT: tl.constexpr,
    SOFT_FP8: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """K or V at `slots` [N] for `kv_head`: [N, BLOCK_D] in OUT_DTYPE (masked entries 0)."""
    rows = slots.to(tl.int64) * KVH + kv_head
    mask = mask_n[:, None] & mask_d[None, :]
    ptrs = cache + rows[:, None] * D + offs_d[None, :]
    if QUANT == 0:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        if QUANT == 2:
            codes = tl.load(ptrs, mask=mask, other=0).to(tl.float32)
        elif SOFT_FP8:  # fp8 codes read as bytes where the GPU cannot convert them
            codes = _e4m3_value(tl.load(ptrs.to(tl.pointer_type(tl.uint8)), mask=mask, other=0))
        else:
            codes = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x = codes * tl.load(scales + rows, mask=mask_n, other=0.0)[:, None]
    return x.to(OUT_DTYPE)


@triton.jit
def _attend(
    q, m, l_sum, acc, visible, k_cache, v_cache, k_scale, v_scale, table, offs_n, mask_n, kv_head,
    offs_d, mask_d, scale, KVH: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    QUANT: tl.constexpr, SOFT_FP8: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One online-softmax step: rows q [R, BLOCK_D] over the tokens `offs_n` of the sequence whose
    block table row is `table`, where `visible` [R or 1, N] allows. Returns the new (m, l_sum, acc)."""
    pages = tl.load(table + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
    slots = pages.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
    k = _kv_tile(k_cache, k_scale, slots, mask_n, kv_head, offs_d, mask_d, KVH, D, QUANT, SOFT_FP8, q.dtype)
    v = _kv_tile(v_cache, v_scale, slots, mask_n, kv_head, offs_d, mask_d, KVH, D, QUANT, SOFT_FP8, q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [R, N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, _max(s, 1))  # finite: every row sees a key in its first tile
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m - m_new)
    l_sum = l_sum * alpha + _sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
    return m_new, l_sum, acc


@triton.jit
def _decode_kernel(
    q, k_cache, v_cache, k_scale, v_scale, tables, lens, out, part_out, part_lse,
    scale, table_stride,
    H: tl.constexpr, KVH: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, QUANT: tl.constexpr, SOFT_FP8: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g, mask_d = offs_g < GROUP, offs_d < D
    heads = kv_head * GROUP + offs_g
    q_rows = b * H + heads
    qg = tl.load(q + q_rows[:, None] * D + offs_d[None, :], mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if DOT_F32:  # the interpreter's tl.dot cannot multiply bfloat16
        qg = qg.to(tl.float32)
    length = tl.load(lens + b)
    per_split = (length + NUM_SPLITS - 1) // NUM_SPLITS  # this sequence's own stretches, whole tiles
    split_len = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        m, l_sum, acc = _attend(
            qg, m, l_sum, acc, mask_n[None, :], k_cache, v_cache, k_scale, v_scale,
            tables + b.to(tl.int64) * table_stride, offs_n, mask_n, kv_head, offs_d, mask_d, scale,
            KVH, D, BLOCK_SIZE, QUANT, SOFT_FP8, PRECISION,
        )  # fmt: skip
    o = acc / tl.maximum(l_sum, _TINY)[:, None]  # an empty stretch: acc = 0, so o = 0
    store_mask = mask_g[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out + q_rows[:, None] * D + offs_d[None, :], o.to(out.dtype.element_ty), mask=store_mask)
    else:
        parts = q_rows.to(tl.int64) * NUM_SPLITS + split
        tl.store(part_out + parts[:, None] * BLOCK_D + offs_d[None, :], o, mask=store_mask)
        lse = tl.where(l_sum > 0, m + tl.log(tl.maximum(l_sum, _TINY)), float("-inf"))
        tl.store(part_lse + parts, lse, mask=mask_g)


@triton.jit
def _merge_kernel(part_out, part_lse, out, D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  BLOCK_S: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # b * H + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s, mask_d = offs_s < NUM_SPLITS, offs_d < D
    lse = tl.load(part_lse + row * NUM_SPLITS + offs_s, mask=mask_s, other=float("-inf"))
    top = _max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0)  # [S]; all -inf (length 0): all zero
    o = tl.load(
        part_out + (row * NUM_SPLITS + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    merged = _sum(o * w[:, None], 0) / tl.maximum(_sum(w, 0), _TINY)
    tl.store(out + row * D + offs_d, merged.to(out.dtype.element_ty), mask=mask_d)


@triton.jit
def _prefill_kernel(
    q, k_cache, v_cache, k_scale, v_scale, tables, starts, lens, prefixes, out,
    scale, table_stride,
    H: tl.constexpr, KVH: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr, SOFT_FP8: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    chunk, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // GROUP
    q_len = tl.load(lens + chunk)
    first = tl.load(starts + chunk)  # the chunk's first row of the packed batch
    prefix = tl.load(prefixes + chunk)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < q_len, offs_d < D
    q_rows = (first + offs_m).to(tl.int64) * H + head
    qm = tl.load(q + q_rows[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_F32:  # the interpreter's tl.dot cannot multiply bfloat16
        qm = qm.to(tl.float32)
    positions = prefix + offs_m  # [M] each query's position in its sequence
    # keys the tile's last query sees, + 1; none for a tile past its chunk (the grid fits the longest)
    end = tl.where(tile * BLOCK_M < q_len, prefix + tl.minimum((tile + 1) * BLOCK_M, q_len), 0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        visible = mask_n[None, :] & (offs_n[None, :] <= positions[:, None])  # causal
        m, l_sum, acc = _attend(
            qm, m, l_sum, acc, visible, k_cache, v_cache, k_scale, v_scale,
            tables + chunk.to(tl.int64) * table_stride, offs_n, mask_n, kv_head, offs_d, mask_d, scale,
            KVH, D, BLOCK_SIZE, QUANT, SOFT_FP8, PRECISION,
        )  # fmt: skip
    o = acc / tl.maximum(l_sum, _TINY)[:, None]
    tl.store(out + q_rows[:, None] * D + offs_d[None, :], o.to(out.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])  # fmt: skip


@triton.jit
def _store_codes(cache, scales, x, dst, rows, mask, mask_h, QUANT: tl.constexpr, QMAX: tl.constexpr,
                 SOFT_FP8: tl.constexpr):  # fmt: skip
    """Rows x [KVH, D] quantized with scale = absmax / QMAX each: codes to `dst`, scales to `rows`."""
    x = x.to(tl.float32)
    scale = tl.maximum(_max(tl.abs(x), 1), _TINY) / QMAX
    y = tl.math.div_rn(x, scale[:, None])
    if QUANT == 1:
        if SOFT_FP8:
            tl.store(cache.to(tl.pointer_type(tl.uint8)) + dst, _e4m3_bits(y), mask=mask)
        else:
            tl.store(cache + dst, y.to(tl.float8e4nv), mask=mask)
    else:
        tl.store(cache + dst, tl.minimum(tl.maximum(tl.floor(y + 0.5), -QMAX), QMAX).to(tl.int8), mask=mask)
    tl.store(scales + rows, scale, mask=mask_h)


@triton.jit
def _store_kernel(
    k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, k_stride, v_stride,
    KVH: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, QMAX: tl.constexpr, SOFT_FP8: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # slot -1: a padded row. (The scalar test is broadcast by hand: the interpreter rejects a mask
    # that broadcasts a scalar.)
    mask_h = (offs_h < KVH) & ((offs_h * 0 + slot) >= 0)
    mask = mask_h[:, None] & (offs_d[None, :] < D)
    src = offs_h[:, None] * D + offs_d[None, :]
    dst = (slot * KVH + offs_h)[:, None] * D + offs_d[None, :]
    kx = tl.load(k + t.to(tl.int64) * k_stride + src, mask=mask, other=0.0)
    vx = tl.load(v + t.to(tl.int64) * v_stride + src, mask=mask, other=0.0)
    if QUANT == 0:
        tl.store(k_cache + dst, kx.to(k_cache.dtype.element_ty), mask=mask)
        tl.store(v_cache + dst, vx.to(v_cache.dtype.element_ty), mask=mask)
    else:
        _store_codes(k_cache, k_scale, kx, dst, slot * KVH + offs_h, mask, mask_h, QUANT, QMAX, SOFT_FP8)
        _store_codes(v_cache, v_scale, vx, dst, slot * KVH + offs_h, mask, mask_h, QUANT, QMAX, SOFT_FP8)


# --- launchers ----------------------------------------------------------------------------------


def available(device: torch.device) -> bool:
    """Whether the compiled kernels serve tensors on `device`: CUDA only (CPU tensors take the reference)."""
    return device.type == "cuda" and torch.cuda.is_available()


def _interpreted() -> bool:
    return not isinstance(_decode_kernel, JITFunction)


def _quant_kind(cache: torch.Tensor, scale: torch.Tensor | None) -> int:
    """0: plain cache, 1: fp8 codes, 2: int8 codes (each with a float32 scale per slot and head)."""
    if cache.dtype not in KV_CACHE_QMAX:
        if scale is not None:
            raise ValueError(f"a {cache.dtype} cache takes no scales")
        return 0
    if scale is None or scale.dtype != torch.float32 or scale.shape != cache.shape[:3]:
        raise ValueError(f"a {cache.dtype} cache needs float32 scales of shape {tuple(cache.shape[:3])}")
    return 1 if cache.dtype == torch.float8_e4m3fn else 2


def _soft_fp8(device: torch.device) -> bool:
    if _interpreted() or device.type != "cuda" or torch.version.hip is not None:
        return True
    return torch.cuda.get_device_capability(device) < (8, 9)


def _common(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale) -> dict:
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"K and V caches differ: {tuple(k_cache.shape)} {k_cache.dtype}, "
                         f"{tuple(v_cache.shape)} {v_cache.dtype}")  # fmt: skip
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and q.is_contiguous()):
        raise ValueError("q and the caches must be contiguous")
    num_heads = q.shape[1]
    if q.shape[-1] != head_dim or num_heads % kv_heads:
        raise ValueError(
            f"{num_heads} query heads of dim {q.shape[-1]} do not fit {kv_heads} KV heads of {head_dim}"
        )
    quant = _quant_kind(k_cache, k_scale)
    if _quant_kind(v_cache, v_scale) != quant:
        raise ValueError("K and V caches must be quantized alike")
    dummy = k_cache.new_empty(0, dtype=torch.float32)
    return dict(
        scales=(k_scale if quant else dummy, v_scale if quant else dummy),
        constexprs=dict(
            H=num_heads,
            KVH=kv_heads,
            GROUP=num_heads // kv_heads,
            D=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_SIZE=block_size,
            QUANT=quant,
            SOFT_FP8=_soft_fp8(k_cache.device),
            PRECISION="ieee" if q.dtype == torch.float32 or _interpreted() else "tf32",
            DOT_F32=_interpreted(),
        ),
    )


def num_splits(batch: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits of the context per (sequence, KV head): enough programs for two waves over the GPU's
    multiprocessors, each split at least MIN_SPLIT_TOKENS long."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if available(device) else 132
    want = math.ceil(2 * sms / max(1, batch * kv_heads))
    return max(1, min(want, max_context // MIN_SPLIT_TOKENS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """As kernels.paged_attention.paged_decode_attention_ref: q [B, H, D] over block tables [B, nb]
    (int32/int64) and context lengths [B] -> [B, H, D]; `splits` overrides the split count."""
    setup = _common(q, k_cache, v_cache, k_scale, v_scale)
    c = setup["constexprs"]
    batch = q.shape[0]
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_tables = block_tables.contiguous()
    max_context = block_tables.shape[1] * c["BLOCK_SIZE"]
    if splits is None:
        splits = num_splits(batch, c["KVH"], max_context, q.device)
    elif splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if splits > 1:
        part_out = q.new_empty(batch * c["H"] * splits * c["BLOCK_D"], dtype=torch.float32)
        part_lse = q.new_empty(batch * c["H"] * splits, dtype=torch.float32)
    else:
        part_out = part_lse = out
    _decode_kernel[(batch, c["KVH"], splits)](
        q, k_cache, v_cache, *setup["scales"], block_tables, context_lens, out, part_out, part_lse,
        scale, block_tables.stride(0),
        BLOCK_G=max(16, triton.next_power_of_2(c["GROUP"])), BLOCK_N=DECODE_BLOCK_N, NUM_SPLITS=splits, **c,
    )  # fmt: skip
    if splits > 1:
        _merge_kernel[(batch * c["H"],)](
            part_out, part_lse, out, D=c["D"], BLOCK_D=c["BLOCK_D"], NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits),
        )  # fmt: skip
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    prefixes: torch.Tensor,
    max_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """As kernels.paged_attention.paged_prefill_attention_ref: packed chunks' queries q [T, H, D],
    chunk c being rows starts[c] .. starts[c] + lens[c] at positions prefixes[c] + i of the sequence
    whose blocks are block_tables[c] (its K/V already stored); `max_len` >= every lens[c].
    Returns [T, H, D] (rows outside every chunk are left unwritten)."""
    setup = _common(q, k_cache, v_cache, k_scale, v_scale)
    c = setup["constexprs"]
    out = torch.empty_like(q)
    num_chunks = starts.shape[0]
    if num_chunks == 0 or max_len == 0:
        return out
    block_tables = block_tables.contiguous()
    grid = (num_chunks, c["H"], triton.cdiv(max_len, PREFILL_BLOCK_M))
    _prefill_kernel[grid](
        q, k_cache, v_cache, *setup["scales"], block_tables, starts, lens, prefixes, out,
        scale, block_tables.stride(0), BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, **c,
    )  # fmt: skip
    return out


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """As kernels.paged_attention.store_kv_ref: k, v [T, KVH, D] (rows may be strided views) into
    their slots [T] (-1: skip); a quantized cache gets codes and a scale per (slot, head)."""
    _, _, kv_heads, head_dim = k_cache.shape
    quant = _quant_kind(k_cache, k_scale)
    if _quant_kind(v_cache, v_scale) != quant:
        raise ValueError("K and V caches must be quantized alike")
    for x in (k, v):
        if x.shape[1:] != (kv_heads, head_dim) or x.stride(2) != 1 or x.stride(1) != head_dim:
            raise ValueError(f"new K/V must be [T, {kv_heads}, {head_dim}] with contiguous heads")
    if slot_mapping.shape[0] == 0:
        return
    dummy = k_cache.new_empty(0, dtype=torch.float32)
    _store_kernel[(slot_mapping.shape[0],)](
        k, v, k_cache, v_cache, k_scale if quant else dummy, v_scale if quant else dummy, slot_mapping,
        k.stride(0), v.stride(0), KVH=kv_heads, BLOCK_H=triton.next_power_of_2(kv_heads), D=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), QUANT=quant, QMAX=KV_CACHE_QMAX.get(k_cache.dtype, 0.0),
        SOFT_FP8=_soft_fp8(k_cache.device),
    )  # fmt: skip
