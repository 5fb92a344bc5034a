"""KV block codecs in plain torch: quantize + pack a request's blocks straight out of the engine's
cache into a frame payload, and unpack + dequantize a payload straight into another cache's blocks.
This is the CPU path and the oracle for the Triton kernels (kernels/kv_quant_triton.py).

The cache is engine/kv_cache.py's [layers, 2, blocks, block_size, kv_heads, head_dim]. A payload
holds layers [a, b) of n blocks (in the request's order), one segment per layer, back to back;
each segment is laid out as below (shapes in elements, n = blocks, t = block_size, h = kv_heads,
d = head_dim; all offsets stay aligned to the element size):

  codec  segment of one layer
  none   K [n,t,h,d] cache dtype | V [n,t,h,d]                     (exact bytes)
  fp8    K scale f32 [n,h] | V scale f32 [n,h] | K e4m3 [n,t,h,d] | V e4m3 [n,t,h,d]
         scale = amax over the (block, head) tile / 448
  int8   K range f16 [n,h,2] | V range f16 [n,h,2] | K codes u8 [n,h,d] | V codes u8 [n,t,h]
  int4     | K values [n,t,h,d*bits/8] | V values [n,t,h,d*bits/8]      (int4: two values a byte,
                                                                        element 2i in the low nibble)

int8 / int4 are asymmetric with two levels of scales (the KIVI / KVQuant grouping): keys are
quantized per channel within a block (a group = one channel of one head over the block's t
tokens), values per token (a group = one token of one head over d). Each (block, head) tile of K
and of V stores its range [lo, hi] in float16; each group stores one byte: the low nibble places the
group's minimum and the high nibble its maximum, rounded outward, on the 15-step grid spanning the
tile's range. A group's values are then quantized to 2^bits - 1 steps between those two points.
Measured on SmolLM2-135M (docs/benchmarks.md), this keeps int4 within +1% perplexity at 3.7x less
than bfloat16; per-group float16 scale and minimum were +0.3% but only 3.05x, symmetric 4-bit
with one-byte scales +2.7%.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

CODECS = ("none", "fp8", "int8", "int4")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
F16_MAX = 65504.0  # tile ranges are stored in float16; larger magnitudes saturate
TINY = 1e-12  # floor for scales, so all-zero tiles quantize to zero instead of NaN


def codec_bits(codec: str) -> int:
    return {"int8": 8, "int4": 4}[codec]


def segment_sizes(codec: str, n: int, t: int, h: int, d: int, itemsize: int) -> list[tuple[str, int]]:
    """(part, bytes) of one layer's segment, in order. itemsize is the cache dtype's."""
    if codec == "none":
        return [("k", n * t * h * d * itemsize), ("v", n * t * h * d * itemsize)]
    if codec == "fp8":
        return [("k_scale", n * h * 4), ("v_scale", n * h * 4), ("k", n * t * h * d), ("v", n * t * h * d)]
    bits = codec_bits(codec)
    if bits == 4 and d % 2:
        raise ValueError(f"int4 packs pairs along head_dim; head_dim {d} is odd")
    values = n * t * h * d * bits // 8
    return [
        ("k_range", n * h * 2 * 2),
        ("v_range", n * h * 2 * 2),
        ("k_codes", n * h * d),
        ("v_codes", n * t * h),
        ("k", values),
        ("v", values),
    ]


def layer_nbytes(codec: str, n: int, t: int, h: int, d: int, itemsize: int) -> int:
    return sum(size for _, size in segment_sizes(codec, n, t, h, d, itemsize))


def split_segment(segment: torch.Tensor, codec: str, n: int, t: int, h: int, d: int, dtype: torch.dtype):
    """Typed views of one layer's segment (uint8 [layer_nbytes]) by part name."""
    views, offset = {}, 0
    for part, size in segment_sizes(codec, n, t, h, d, dtype.itemsize):
        raw = segment[offset : offset + size]
        offset += size
        if part in ("k", "v") and codec == "none":
            views[part] = raw.view(dtype).view(n, t, h, d)
        elif part in ("k", "v") and codec == "fp8":
            views[part] = raw.view(torch.float8_e4m3fn).view(n, t, h, d)
        elif part in ("k", "v"):
            views[part] = raw.view(n, t, h, -1)
        elif part.endswith("scale"):
            views[part] = raw.view(torch.float32).view(n, h)
        elif part.endswith("range"):
            views[part] = raw.view(torch.float16).view(n, h, 2)
        elif part == "k_codes":
            views[part] = raw.view(n, h, d)
        else:
            views[part] = raw.view(n, t, h)
    return views


# --- int8 / int4: two-level asymmetric ---------------------------------------------------------


def _group_grid(x: torch.Tensor, tile_range: torch.Tensor, group_dim: int, bits: int):
    """Codes and (lo, step) per group. x: [n,t,h,d] float32; tile_range: [n,h,2] (float16 values)."""
    lo_t = tile_range[..., 0].float()[:, None, :, None]  # [n,1,h,1]
    hi_t = tile_range[..., 1].float()[:, None, :, None]
    delta = ((hi_t - lo_t) / 15.0).clamp_min(TINY)
    lo_c = torch.floor((x.amin(group_dim, keepdim=True) - lo_t) / delta).clamp(0, 14)
    hi_c = torch.ceil((x.amax(group_dim, keepdim=True) - lo_t) / delta).clamp(0, 15)
    hi_c = torch.maximum(hi_c, lo_c + 1)
    lo = lo_t + lo_c * delta
    step = (hi_c - lo_c) * delta / (2**bits - 1)
    return lo_c, hi_c, lo, step


def _quantize_int(x: torch.Tensor, group_dim: int, bits: int):
    """x [n,t,h,d] float32 -> (tile range f16 [n,h,2], codes u8 (group shape), values u8 [n,t,h,d*bits/8])."""
    tile_range = torch.stack([x.amin(dim=(1, 3)), x.amax(dim=(1, 3))], dim=-1)
    tile_range = tile_range.clamp(-F16_MAX, F16_MAX).to(torch.float16)
    lo_c, hi_c, lo, step = _group_grid(x, tile_range, group_dim, bits)
    q = torch.floor((x - lo) / step + 0.5).clamp(0, 2**bits - 1).to(torch.uint8)
    codes = (lo_c + hi_c * 16).to(torch.uint8).squeeze(group_dim)  # keys [n,h,d], values [n,t,h]
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return tile_range, codes, q


def _dequantize_int(
    tile_range: torch.Tensor, codes: torch.Tensor, q: torch.Tensor, group_dim: int, bits: int
):
    """Inverse of _quantize_int; returns float32 [n,t,h,d]."""
    if bits == 4:
        q = torch.stack([q & 15, q >> 4], dim=-1).flatten(-2)
    codes = codes[:, None] if group_dim == 1 else codes[..., None]  # broadcast over the group dim
    lo_c, hi_c = (codes & 15).float(), (codes >> 4).float()
    lo_t = tile_range[..., 0].float()[:, None, :, None]
    hi_t = tile_range[..., 1].float()[:, None, :, None]
    delta = ((hi_t - lo_t) / 15.0).clamp_min(TINY)
    step = (hi_c - lo_c) * delta / (2**bits - 1)
    return lo_t + lo_c * delta + q.float() * step


# --- whole payloads ----------------------------------------------------------------------------


PIECE_BYTES = 1 << 20  # about one core's L2: a piece handed to on_piece is still in cache
OnPiece = Callable[[torch.Tensor], None]


def _layer_segments(
    payload: torch.Tensor, cache: torch.Tensor, layers: tuple[int, int], block_ids: torch.Tensor, codec: str
) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
    """(layer, its segment, typed views of it) for each layer of a payload, after checking its size."""
    a, b = layers
    _, _, _, t, h, d = cache.shape
    n = block_ids.numel()
    seg = layer_nbytes(codec, n, t, h, d, cache.element_size())
    if payload.numel() != seg * (b - a):
        raise ValueError(f"payload holds {payload.numel()} bytes, layers {a}-{b - 1} need {seg * (b - a)}")
    for i, layer in enumerate(range(a, b)):
        segment = payload[i * seg : (i + 1) * seg]
        yield layer, segment, split_segment(segment, codec, n, t, h, d, cache.dtype)


def _pieces(view: torch.Tensor, on_piece: OnPiece | None) -> Iterator[slice]:
    """Runs of whole blocks of `view` ([n, t, h, d]) of about PIECE_BYTES, in order; all of it
    at once when nobody watches the pieces."""
    num_blocks = view.shape[0]
    step = max(1, PIECE_BYTES // (view[0].numel() * view.element_size())) if on_piece else num_blocks
    for lo in range(0, num_blocks, step):
        yield slice(lo, min(lo + step, num_blocks))


def scatter_blocks(dst: torch.Tensor, block_ids: torch.Tensor, src: torch.Tensor) -> None:
    """dst[block_ids] = src along dim 0 (dst one layer's K or V [N,t,h,d], src [n,t,h,d]).

    On the CPU torch's index_copy_ moves a block element by element (6.5 GB/s for bfloat16 on a
    2-core EPYC VM, where a gather runs at 14-16); numpy's row assignment over an int64 view of
    the same memory copies whole rows (19.7 GB/s, memcpy speed). Devices keep index_copy_."""
    rows = dst[0].numel() * dst.element_size()
    if dst.is_cuda or rows % 8 or not (dst.is_contiguous() and src.is_contiguous()):
        dst.index_copy_(0, block_ids, src)
        return
    try:
        dst_rows = dst.view(dst.shape[0], -1).view(torch.int64).numpy()
        src_rows = src.view(src.shape[0], -1).view(torch.int64).numpy()
    except RuntimeError:  # a storage offset not aligned to 8 bytes: no int64 view
        dst.index_copy_(0, block_ids, src)
        return
    dst_rows[block_ids.numpy()] = src_rows


def copy_blocks(dst: torch.Tensor, dst_ids: torch.Tensor, src: torch.Tensor, src_ids: torch.Tensor) -> None:
    """dst[:, :, dst_ids] = src[:, :, src_ids] for caches [layers, 2, blocks, ...] (views of some
    layers and heads of each): one copy, run by run. Blocks consecutive on both sides go in one
    slice copy, so a request whose blocks were allocated in order moves at memcpy speed."""
    d, s_ = dst_ids.tolist(), src_ids.tolist()
    start = 0
    for i in range(1, len(d) + 1):
        if i == len(d) or d[i] != d[i - 1] + 1 or s_[i] != s_[i - 1] + 1:
            n = i - start
            dst[:, :, d[start] : d[start] + n].copy_(src[:, :, s_[start] : s_[start] + n])
            start = i


def encode_ref(
    cache: torch.Tensor,
    layers: tuple[int, int],
    block_ids: torch.Tensor,
    codec: str,
    out: torch.Tensor,
    on_piece: OnPiece | None = None,
) -> None:
    """Encode layers [a, b) of `block_ids` (int64 [n], cache's device) of `cache` into `out` (uint8).

    `on_piece`, when given, sees every byte of `out` exactly once, in order, right after it is
    written: runs of about PIECE_BYTES for `none`, whole layer segments for the other codecs."""
    for layer, segment, views in _layer_segments(out, cache, layers, block_ids, codec):
        for kv, name in ((0, "k"), (1, "v")):
            if codec == "none":  # gather straight into the payload: one copy
                for piece in _pieces(views[name], on_piece):
                    torch.index_select(cache[layer, kv], 0, block_ids[piece], out=views[name][piece])
                    if on_piece is not None:
                        on_piece(views[name][piece])
                continue
            x = cache[layer, kv].index_select(0, block_ids)  # [n,t,h,d]
            if codec == "fp8":
                xf = x.float()
                scale = (xf.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(TINY)  # [n,h]
                views[f"{name}_scale"].copy_(scale)
                views[name].copy_((xf / scale[:, None, :, None]).to(torch.float8_e4m3fn))
            else:
                tile_range, codes, q = _quantize_int(x.float(), 1 if name == "k" else 3, codec_bits(codec))
                views[f"{name}_range"].copy_(tile_range)
                views[f"{name}_codes"].copy_(codes)
                views[name].copy_(q)
        if codec != "none" and on_piece is not None:
            on_piece(segment)


def decode_ref(
    payload: torch.Tensor,
    cache: torch.Tensor,
    layers: tuple[int, int],
    block_ids: torch.Tensor,
    codec: str,
    on_piece: OnPiece | None = None,
) -> None:
    """Decode a payload made by encode_ref into `cache` at `block_ids` (the receiver's own blocks).

    `on_piece`, when given, sees every byte of `payload` exactly once, in order, right before it is
    read (the pieces encode_ref hands out)."""
    for layer, segment, views in _layer_segments(payload, cache, layers, block_ids, codec):
        if codec != "none" and on_piece is not None:
            on_piece(segment)
        for kv, name in ((0, "k"), (1, "v")):
            if codec == "none":
                for piece in _pieces(views[name], on_piece):
                    if on_piece is not None:
                        on_piece(views[name][piece])
                    scatter_blocks(cache[layer, kv], block_ids[piece], views[name][piece])
                continue
            if codec == "fp8":
                x = views[name].float() * views[f"{name}_scale"][:, None, :, None]
            else:
                group_dim = 1 if name == "k" else 3
                x = _dequantize_int(
                    views[f"{name}_range"], views[f"{name}_codes"], views[name], group_dim, codec_bits(codec)
                )
            scatter_blocks(cache[layer, kv], block_ids, x.to(cache.dtype))
