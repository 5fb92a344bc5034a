"""KV block codecs in Triton: the GPU path of kernels/kv_quant.py, same signatures, same payload layout.

`encode_triton` gathers a request's blocks straight out of the cache and quantizes + packs them into the
payload; `decode_triton` unpacks + dequantizes a payload straight into another cache's blocks. Each is
one launch over every (layer, K/V, block, head) tile, and a program does all of its tile's work in
registers, because every statistic of the codecs (the fp8 scale, the int tile range, the per-group
codes) comes from that tile alone:

    grid (n * h, b - a, 2)   program (j * h + head, i, kv):
        tile = cache[a + i, kv, block_ids[j], :, head, :]                 [t, d]
        writes its slice of every part of layer a + i's segment: scale or range [j, head],
        K codes [j, head, :] / V codes [j, :, head], values [j, :, head, :]

Exactness: the kernels repeat the reference's float32 arithmetic op for op (IEEE division via div_rn, no
fused multiply-add, floor(x + 0.5) rounding), so payloads and decoded blocks match encode_ref /
decode_ref bit for bit (so measured in the interpreter) as long as float32 -> bfloat16 / float8
conversions round to nearest even. Triton's interpreter (TRITON_INTERPRET=1, which the CPU tests use)
does not: it truncates to bfloat16 and mis-rounds float8. There, and on GPUs without native e4m3
conversions (before sm_89, ROCm), the kernels convert with integer bit manipulation (`_e4m3_bits`,
`_e4m3_value`, `_bf16_bits`) that reproduces torch's conversions, except that it saturates at +-448 like
the GPU's satfinite conversion where torch gives NaN from 464 up (x / scale never exceeds 448).

Dispatch: the compiled kernels take CUDA tensors; the engine calls them when `available(device)` and
the reference otherwise:

    encode = encode_triton if available(cache.device) else encode_ref
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels import kv_quant
from kernels.kv_quant import CODECS, layer_nbytes, segment_sizes

# The reference's constants, as constexprs a kernel can read.
_FP8_MAX = tl.constexpr(kv_quant.FP8_MAX)
_F16_MAX = tl.constexpr(kv_quant.F16_MAX)
_TINY = tl.constexpr(kv_quant.TINY)

# --- reductions ---------------------------------------------------------------------------------
# tl.max / tl.min are themselves @triton.jit functions, bound to the interpreter or the compiler when
# triton is first imported. Reducing with their combine functions directly keeps these kernels runnable
# by an interpreted copy of this module made at any time (tests/kernels/test_kv_quant.py), and the
# interpreter still recognises them and reduces with numpy.
_max2 = tl.standard._elementwise_max
_min2 = tl.standard._elementwise_min


@triton.jit
def _amax(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _max2, keep_dims=True)


@triton.jit
def _amin(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _min2, keep_dims=True)


@triton.jit
def _tile_amax(x):
    return tl.reduce(tl.reduce(x, 1, _max2), 0, _max2)


@triton.jit
def _tile_amin(x):
    return tl.reduce(tl.reduce(x, 1, _min2), 0, _min2)


# --- conversions that are exact on every backend ------------------------------------------------


@triton.jit
def _e4m3_bits(y):
    """float32 -> float8_e4m3fn bits (uint8): round to nearest even, saturate finite values at +-448."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # Normal e4m3 (|y| >= 2^-6): drop 20 of float32's 23 mantissa bits, ties to even, rebias 127 -> 7.
    normal = tl.minimum(((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3), 0x7E)
    # Subnormal e4m3: adding 2^14 leaves |y| rounded to a multiple of 2^-9 in the low mantissa bits.
    sub = (tl.abs(y) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
    code = tl.where(mag < (121 << 23), sub, normal)
    code = tl.where(mag > 0x7F800000, 0x7F, code)  # NaN
    return (code | sign).to(tl.uint8)


@triton.jit
def _e4m3_value(code):
    """float8_e4m3fn bits (uint8) -> float32, exactly."""
    c = code.to(tl.uint32)
    sign = (c & 0x80) << 24
    mag = c & 0x7F
    normal = (mag + (120 << 3)) << 20  # exponent rebias 7 -> 127, mantissa to the top
    sub = (mag.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)  # m * 2^-9
    bits = tl.where(mag < 8, sub, normal)
    bits = tl.where(mag == 0x7F, 0x7FC00000, bits)
    return (bits | sign).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_bits(x):
    """float32 -> bfloat16 bits (uint16), round to nearest even, as torch converts."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def _load_f32(ptrs, SOFT_BF16: tl.constexpr):
    if SOFT_BF16:
        raw = tl.load(ptrs.to(tl.pointer_type(tl.uint16)))
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs).to(tl.float32)


@triton.jit
def _store_f32(ptrs, x, SOFT_BF16: tl.constexpr):
    if SOFT_BF16:
        tl.store(ptrs.to(tl.pointer_type(tl.uint16)), _bf16_bits(x))
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty))


# --- int8 / int4 tiles --------------------------------------------------------------------------


@triton.jit
def _grid_step(lo_c, hi_c, delta, LEVELS: tl.constexpr):
    return tl.math.div_rn((hi_c - lo_c) * delta, LEVELS)


@triton.jit
def _tile_delta(lo_t, hi_t):
    return tl.maximum(tl.math.div_rn(hi_t - lo_t, 15.0), _TINY)


@triton.jit
def _quantize_tile(x, lo_t, delta, AXIS: tl.constexpr, LEVELS: tl.constexpr):
    """x [t, d] float32, groups along AXIS -> (codes [1, d] or [t, 1] uint8, q [t, d] uint8)."""
    lo_c = tl.floor(tl.math.div_rn(_amin(x, AXIS) - lo_t, delta))
    hi_c = tl.ceil(tl.math.div_rn(_amax(x, AXIS) - lo_t, delta))
    lo_c = tl.minimum(tl.maximum(lo_c, 0.0), 14.0)
    hi_c = tl.maximum(tl.minimum(tl.maximum(hi_c, 0.0), 15.0), lo_c + 1.0)
    lo = lo_t + lo_c * delta
    step = _grid_step(lo_c, hi_c, delta, LEVELS)
    q = tl.floor(tl.math.div_rn(x - lo, step) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), LEVELS)
    return (lo_c + hi_c * 16.0).to(tl.uint8), q.to(tl.uint8)


@triton.jit
def _dequantize_tile(q, codes, lo_t, delta, LEVELS: tl.constexpr):
    """q [t, d] uint8, codes [1, d] or [t, 1] uint8 -> [t, d] float32."""
    lo_c = (codes & 15).to(tl.float32)
    hi_c = (codes >> 4).to(tl.float32)
    step = _grid_step(lo_c, hi_c, delta, LEVELS)
    return lo_t + lo_c * delta + q.to(tl.float32) * step


@triton.jit
def _store_values(ptrs_u8, q, T: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Store q [t, d] uint8 at byte pointers [t, d * BITS / 8] (int4: element 2i in the low nibble)."""
    if BITS == 4:
        even, odd = tl.split(tl.reshape(q, [T, D // 2, 2]))
        tl.store(ptrs_u8, even | (odd << 4))
    else:
        tl.store(ptrs_u8, q)


@triton.jit
def _load_values(ptrs_u8, T: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    packed = tl.load(ptrs_u8)
    if BITS == 4:
        return tl.reshape(tl.join(packed & 15, packed >> 4), [T, D])
    else:
        return packed


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _encode_kernel(
    cache_ptr,  # [L, 2, num_blocks, T, H, D]
    block_ids_ptr,  # int64 [n]
    out_ptr,  # uint8 [layers * seg_bytes]
    layer_start,
    num_blocks,
    H,
    seg_bytes,
    meta_k,  # byte offsets of the parts within a segment (see kv_quant.segment_sizes)
    meta_v,
    codes_k,
    codes_v,
    vals_k,
    vals_v,
    T: tl.constexpr,
    D: tl.constexpr,
    CODEC: tl.constexpr,
    BITS: tl.constexpr,
    SOFT_FP8: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    tile = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    kv = tl.program_id(2)
    j = (tile // H).to(tl.int64)
    head = tile % H
    block = tl.load(block_ids_ptr + j)
    rows = tl.arange(0, T)[:, None]
    cols = tl.arange(0, D)[None, :]
    src = cache_ptr + (((layer_start + i) * 2 + kv) * num_blocks + block) * (T * H * D) + head * D
    src = src + rows * (H * D) + cols  # [T, D]
    seg = out_ptr + i * seg_bytes
    tok = (j * T + rows) * H + head  # [T, 1]: row of [n, t, h] in the payload
    tile_idx = j * H + head  # entry of [n, h] in the payload
    vals = seg + tl.where(kv == 0, vals_k, vals_v)
    if CODEC == "none":
        dst = vals.to(tl.pointer_type(cache_ptr.dtype.element_ty)) + tok * D + cols
        tl.store(dst, tl.load(src))
    elif CODEC == "fp8":
        x = _load_f32(src, SOFT_BF16)
        scale = tl.maximum(tl.math.div_rn(_tile_amax(tl.abs(x)), _FP8_MAX), _TINY)
        meta = (seg + tl.where(kv == 0, meta_k, meta_v)).to(tl.pointer_type(tl.float32))
        tl.store(meta + tile_idx, scale)
        y = tl.math.div_rn(x, scale)
        if SOFT_FP8:
            code = _e4m3_bits(y)
        else:
            code = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        tl.store(vals + tok * D + cols, code)
    else:
        x = _load_f32(src, SOFT_BF16)
        lo16 = tl.minimum(tl.maximum(_tile_amin(x), -_F16_MAX), _F16_MAX).to(tl.float16)
        hi16 = tl.minimum(tl.maximum(_tile_amax(x), -_F16_MAX), _F16_MAX).to(tl.float16)
        meta = (seg + tl.where(kv == 0, meta_k, meta_v)).to(tl.pointer_type(tl.float16)) + tile_idx * 2
        tl.store(meta, lo16)
        tl.store(meta + 1, hi16)
        lo_t = lo16.to(tl.float32)
        delta = _tile_delta(lo_t, hi16.to(tl.float32))
        LEVELS: tl.constexpr = 2**BITS - 1
        DP: tl.constexpr = D * BITS // 8
        dst = vals + tok * DP + tl.arange(0, DP)[None, :]  # [T, DP]
        if kv == 0:  # keys: a group is one channel over the block's tokens
            channel_codes, q = _quantize_tile(x, lo_t, delta, 0, LEVELS)  # [1, D]
            tl.store(seg + codes_k + tile_idx * D + cols, channel_codes)
            _store_values(dst, q, T, D, BITS)
        else:  # values: a group is one token over head_dim
            token_codes, q = _quantize_tile(x, lo_t, delta, 1, LEVELS)  # [T, 1]
            tl.store(seg + codes_v + tok, token_codes)
            _store_values(dst, q, T, D, BITS)


@triton.jit
def _decode_kernel(
    payload_ptr,  # uint8 [layers * seg_bytes]
    cache_ptr,  # [L, 2, num_blocks, T, H, D]
    block_ids_ptr,  # int64 [n]
    layer_start,
    num_blocks,
    H,
    seg_bytes,
    meta_k,
    meta_v,
    codes_k,
    codes_v,
    vals_k,
    vals_v,
    T: tl.constexpr,
    D: tl.constexpr,
    CODEC: tl.constexpr,
    BITS: tl.constexpr,
    SOFT_FP8: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    tile = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    kv = tl.program_id(2)
    j = (tile // H).to(tl.int64)
    head = tile % H
    block = tl.load(block_ids_ptr + j)
    rows = tl.arange(0, T)[:, None]
    cols = tl.arange(0, D)[None, :]
    dst = cache_ptr + (((layer_start + i) * 2 + kv) * num_blocks + block) * (T * H * D) + head * D
    dst = dst + rows * (H * D) + cols  # [T, D]
    seg = payload_ptr + i * seg_bytes
    tok = (j * T + rows) * H + head
    tile_idx = j * H + head
    vals = seg + tl.where(kv == 0, vals_k, vals_v)
    if CODEC == "none":
        src = vals.to(tl.pointer_type(cache_ptr.dtype.element_ty)) + tok * D + cols
        tl.store(dst, tl.load(src))
    elif CODEC == "fp8":
        scale = tl.load((seg + tl.where(kv == 0, meta_k, meta_v)).to(tl.pointer_type(tl.float32)) + tile_idx)
        code = tl.load(vals + tok * D + cols)
        if SOFT_FP8:
            y = _e4m3_value(code)
        else:
            y = code.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        _store_f32(dst, y * scale, SOFT_BF16)
    else:
        meta = (seg + tl.where(kv == 0, meta_k, meta_v)).to(tl.pointer_type(tl.float16)) + tile_idx * 2
        lo_t = tl.load(meta).to(tl.float32)
        delta = _tile_delta(lo_t, tl.load(meta + 1).to(tl.float32))
        LEVELS: tl.constexpr = 2**BITS - 1
        DP: tl.constexpr = D * BITS // 8
        q = _load_values(vals + tok * DP + tl.arange(0, DP)[None, :], T, D, BITS)
        if kv == 0:
            channel_codes = tl.load(seg + codes_k + tile_idx * D + cols)  # [1, D]
            _store_f32(dst, _dequantize_tile(q, channel_codes, lo_t, delta, LEVELS), SOFT_BF16)
        else:
            token_codes = tl.load(seg + codes_v + tok)  # [T, 1]
            _store_f32(dst, _dequantize_tile(q, token_codes, lo_t, delta, LEVELS), SOFT_BF16)


# --- launchers ----------------------------------------------------------------------------------


def available(device: torch.device) -> bool:
    """Whether the compiled kernels serve tensors on `device`: CUDA only (CPU tensors take the reference)."""
    return device.type == "cuda" and torch.cuda.is_available()


def _interpreted() -> bool:
    return not isinstance(_encode_kernel, JITFunction)


def _native_fp8(device: torch.device) -> bool:
    if _interpreted() or device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _part_offsets(codec: str, n: int, t: int, h: int, d: int, itemsize: int) -> list[int]:
    """Byte offsets of a segment's parts [meta_k, meta_v, codes_k, codes_v, vals_k, vals_v] (0: absent)."""
    starts, offset = {}, 0
    for part, size in segment_sizes(codec, n, t, h, d, itemsize):
        starts[part] = offset
        offset += size

    def start(*parts: str) -> int:
        return next((starts[part] for part in parts if part in starts), 0)

    meta = [start("k_scale", "k_range"), start("v_scale", "v_range")]
    return [*meta, start("k_codes"), start("v_codes"), start("k"), start("v")]


def _launch_config(
    payload: torch.Tensor, cache: torch.Tensor, layers: tuple[int, int], block_ids: torch.Tensor, codec: str
) -> tuple[tuple[int, int, int], torch.Tensor, list[int], dict] | None:
    """Checks the arguments; returns (grid, int64 block ids, int args, constexprs), or None: no work."""
    if codec not in CODECS:
        raise ValueError(f"unknown KV codec {codec!r}; expected one of {CODECS}")
    a, b = layers
    num_layers, _, num_blocks, t, h, d = cache.shape
    if not 0 <= a <= b <= num_layers:
        raise ValueError(f"layers {a}-{b - 1} are outside the cache's {num_layers}")
    if t & (t - 1) or d & (d - 1):
        raise ValueError(f"the Triton codecs need power-of-two block_size and head_dim, got {t} and {d}")
    if not cache.is_contiguous() or not payload.is_contiguous() or payload.dtype != torch.uint8:
        raise ValueError("the cache and the payload must be contiguous, the payload uint8")
    if payload.device != cache.device:
        raise ValueError(f"the payload is on {payload.device}, the cache on {cache.device}")
    if payload.data_ptr() % 4:
        raise ValueError("the payload must start 4-byte aligned")
    n = block_ids.numel()
    seg = layer_nbytes(codec, n, t, h, d, cache.element_size())
    if payload.numel() != seg * (b - a):
        raise ValueError(f"payload has {payload.numel()} bytes, layers {a}-{b - 1} need {seg * (b - a)}")
    if n == 0 or a == b:
        return None
    block_ids = block_ids.to(device=cache.device, dtype=torch.int64).contiguous()
    args = [a, num_blocks, h, seg, *_part_offsets(codec, n, t, h, d, cache.element_size())]
    constexprs = dict(
        T=t,
        D=d,
        CODEC=codec,
        BITS={"int8": 8, "int4": 4}.get(codec, 0),
        SOFT_FP8=not _native_fp8(cache.device),
        SOFT_BF16=cache.dtype == torch.bfloat16 and _interpreted(),
        enable_fp_fusion=False,  # a * b + c rounded twice, as torch does
    )
    return (n * h, b - a, 2), block_ids, args, constexprs


def encode_triton(
    cache: torch.Tensor, layers: tuple[int, int], block_ids: torch.Tensor, codec: str, out: torch.Tensor
) -> None:
    """Encode layers [a, b) of `block_ids` (int64 [n]) of `cache` into `out` (uint8); as encode_ref."""
    config = _launch_config(out, cache, layers, block_ids, codec)
    if config is not None:
        grid, block_ids, args, constexprs = config
        _encode_kernel[grid](cache, block_ids, out, *args, **constexprs)


def decode_triton(
    payload: torch.Tensor, cache: torch.Tensor, layers: tuple[int, int], block_ids: torch.Tensor, codec: str
) -> None:
    """Decode a payload into `cache` at `block_ids` (the receiver's own blocks); as decode_ref."""
    config = _launch_config(payload, cache, layers, block_ids, codec)
    if config is not None:
        grid, block_ids, args, constexprs = config
        _decode_kernel[grid](payload, cache, block_ids, *args, **constexprs)
