"""The Triton KV codecs (kernels/kv_quant_triton.py) against the plain-torch reference (kernels/kv_quant.py).

On the CPU the kernels run in Triton's interpreter, on tiny shapes. Rather than setting
TRITON_INTERPRET=1 at the top of this module, the tests load a second, interpreted copy of the kernel
module under `triton.knobs.runtime.scope()`. Triton reads the variable when a function is decorated, so
it would miss a kernel module that an earlier test module (or this one) had already imported, and, set
at import time, it would stay set for every later test module and turn their kernels into interpreted
ones, GPU tests included. The compiled kernels are tested on CUDA when there is a GPU, and compiled for
sm_90 / sm_80 (PTX and cubin, no launch) without one."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import torch
import triton

from kernels import kv_quant_triton
from kernels.kv_quant import decode_ref, encode_ref, layer_nbytes, split_segment

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANTIZED = ("fp8", "int8", "int4")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def interp() -> ModuleType:
    """kernels/kv_quant_triton.py with its kernels decorated for Triton's interpreter (CPU tensors)."""
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        spec = importlib.util.spec_from_file_location(
            "_kv_quant_triton_interpreted", kv_quant_triton.__file__
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    assert module._interpreted()
    return module


def make_cache(dtype, layers=3, blocks=7, t=16, h=2, d=32, device="cpu", seed=0) -> torch.Tensor:
    """[layers, 2, blocks, t, h, d] with per-channel offsets and outliers, like real keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, 2, blocks, t, h, d, generator=g)
    x = x * torch.rand(1, 2, 1, 1, h, d, generator=g) * 3 + torch.randn(1, 2, 1, 1, h, d, generator=g)
    x[..., 0, :, 0] *= 20
    return x.to(device=device, dtype=dtype)


def payload_buffer(codec, layers, n, cache) -> torch.Tensor:
    _, _, _, t, h, d = cache.shape
    return torch.zeros(
        layer_nbytes(codec, n, t, h, d, cache.element_size()) * layers, dtype=torch.uint8, device=cache.device
    )


def parts(payload, codec, n, cache, layers):
    """Typed views of each layer's segment."""
    _, _, _, t, h, d = cache.shape
    seg = layer_nbytes(codec, n, t, h, d, cache.element_size())
    return [
        split_segment(payload[i * seg : (i + 1) * seg], codec, n, t, h, d, cache.dtype) for i in range(layers)
    ]


def assert_payloads_agree(got, want, codec, cache, layers, block_ids):
    """Scales / ranges exact up to float32 rounding, >= 99% of bytes identical, dequantized values within
    one quantization step (codes may differ by one step in rare rounding ties)."""
    a, b = layers
    n = block_ids.numel()
    assert got.shape == want.shape
    assert (got == want).double().mean() >= 0.99, f"{(got != want).sum()} of {got.numel()} bytes differ"
    for g, w in zip(parts(got, codec, n, cache, b - a), parts(want, codec, n, cache, b - a), strict=True):
        for name in ("k", "v"):
            meta = f"{name}_scale" if codec == "fp8" else f"{name}_range"
            torch.testing.assert_close(g[meta].float(), w[meta].float(), rtol=2**-22, atol=0)
    out_shape = (b, 2, n, *cache.shape[3:])
    dequant = []
    for payload in (got, want):
        x = torch.zeros(out_shape, device=cache.device)
        decode_ref(payload, x, layers, torch.arange(n, device=cache.device), codec)
        dequant.append(x[a:b])
    x_got, x_want = dequant
    assert torch.isfinite(x_got).all()
    if codec == "fp8":  # one e4m3 step: 2^-3 relative, 2^-9 of the scale among subnormals
        scale = torch.stack(
            [torch.stack([p["k_scale"], p["v_scale"]]) for p in parts(want, codec, n, cache, b - a)]
        )
        step = x_want.abs() * 2**-3 + scale[:, :, :, None, :, None] * 2**-9
    else:  # a group's step is at most the tile's range over 2^bits - 1
        levels = 2 ** (8 if codec == "int8" else 4) - 1
        rng = torch.stack(
            [torch.stack([p["k_range"], p["v_range"]]) for p in parts(want, codec, n, cache, b - a)]
        )
        step = (rng[..., 1].float() - rng[..., 0].float())[:, :, :, None, :, None] / levels * 1.001 + 1e-6
    assert ((x_got - x_want).abs() <= step).all()


def check_encode(mod, codec, cache, layers, block_ids):
    n = block_ids.numel()
    want = payload_buffer(codec, layers[1] - layers[0], n, cache)
    got = torch.full_like(want, 0xAB)
    encode_ref(cache, layers, block_ids, codec, want)
    mod.encode_triton(cache, layers, block_ids, codec, got)
    if codec == "none":
        assert torch.equal(got, want)
    else:
        assert_payloads_agree(got, want, codec, cache, layers, block_ids)
    return got, want


def check_decode(mod, codec, cache, layers, block_ids, dst_ids):
    """Decode the reference payload into a copy of `cache` at dst_ids with both; compare everything."""
    payload = payload_buffer(codec, layers[1] - layers[0], block_ids.numel(), cache)
    encode_ref(cache, layers, block_ids, codec, payload)
    want, got = cache.clone(), cache.clone()
    decode_ref(payload, want, layers, dst_ids, codec)
    mod.decode_triton(payload, got, layers, dst_ids, codec)
    assert torch.equal(got, want)  # the decoded blocks, and every other block untouched
    a, b = layers
    changed = (got != cache).flatten(3).any(-1)  # [L, 2, blocks]
    assert not changed[:a].any() and not changed[b:].any()
    assert set(changed[a:b].any(0).any(0).nonzero().flatten().tolist()) <= set(dst_ids.tolist())


# --- CPU: the interpreter --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", ("none", *QUANTIZED))
def test_encode_matches_reference(interp, codec, dtype):
    cache = make_cache(dtype)
    check_encode(interp, codec, cache, (1, 3), torch.tensor([5, 0, 3]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", ("none", *QUANTIZED))
def test_decode_matches_reference_into_other_blocks(interp, codec, dtype):
    cache = make_cache(dtype)
    check_decode(interp, codec, cache, (1, 3), torch.tensor([5, 0, 3]), torch.tensor([2, 6, 1]))


@pytest.mark.parametrize("codec", QUANTIZED)
def test_single_block_odd_heads_wide_heads(interp, codec):
    cache = make_cache(torch.bfloat16, layers=2, blocks=3, h=3, d=64, seed=1)
    check_encode(interp, codec, cache, (0, 2), torch.tensor([1]))
    check_decode(interp, codec, cache, (1, 2), torch.tensor([2]), torch.tensor([0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", QUANTIZED)
def test_constant_and_zero_tiles(interp, codec, dtype):
    cache = make_cache(dtype, layers=2, blocks=3)
    cache[:, :, 0] = 0.3  # constant over the whole tile; not a float16 number
    cache[:, 0, 1] = 0.0
    cache[:, 1, 1, :, 1] = -7.25
    got, want = check_encode(interp, codec, cache, (0, 2), torch.tensor([0, 1]))
    out = torch.zeros_like(cache)
    interp.decode_triton(got, out, (0, 2), torch.tensor([0, 1]), codec)
    assert torch.isfinite(out).all()
    assert (out[:, 0, 1] == 0).all()
    torch.testing.assert_close(
        out[:, :, 0].float(), torch.full_like(out[:, :, 0], 0.3).float(), rtol=2e-3, atol=0
    )
    torch.testing.assert_close(out[:, 1, 1, :, 1].float(), torch.full_like(out[:, 1, 1, :, 1], -7.25).float())
    check_decode(interp, codec, cache, (0, 2), torch.tensor([0, 1]), torch.tensor([2, 0]))


def e4m3_probe_values() -> torch.Tensor:
    """Every finite e4m3 value, the midpoints between neighbours (ties) and the floats just beside them,
    subnormals and values below half the smallest subnormal, with both signs."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([torch.nextafter(mid, torch.tensor(0.0)), torch.nextafter(mid, torch.tensor(1e4))])
    tiny = torch.tensor([2.0**-10, 2.0**-11, 3 * 2.0**-11, 2.0**-12, 1e-30, 2.0**-6 - 2.0**-11])
    logs = torch.exp2(torch.linspace(-12, 8.8, 700))
    values = torch.cat([grid, mid, near, tiny, logs])
    return torch.cat([values, -values, torch.tensor([-0.0])])


def fp8_probe_cache(values: torch.Tensor, device="cpu"):
    """float32 cache whose every (block, head) tile has amax exactly 448, so scale = 1 and the payload's
    e4m3 bytes are the conversion of `values` themselves."""
    t, h, d = 16, 2, 64
    per_tile = t * d - 1
    tiles = -(-values.numel() // per_tile)
    blocks = -(-tiles // (2 * h))
    flat = torch.zeros(blocks * 2 * h, t * d)
    flat[:, 0] = 448.0
    padded = torch.cat([values, torch.zeros(flat.shape[0] * per_tile - values.numel())])
    flat[:, 1:] = padded.view(-1, per_tile)
    cache = flat.view(blocks, 2, h, t, d).permute(1, 0, 3, 2, 4)[None].contiguous()  # [1, 2, blocks, t, h, d]
    return cache.to(device), blocks


def check_fp8_bits(mod, device="cpu"):
    values = e4m3_probe_values()
    cache, blocks = fp8_probe_cache(values, device)
    ids = torch.arange(blocks, device=device)
    out = payload_buffer("fp8", 1, blocks, cache)
    mod.encode_triton(cache, (0, 1), ids, "fp8", out)
    (p,) = parts(out, "fp8", blocks, cache, 1)
    assert (p["k_scale"] == 1).all() and (p["v_scale"] == 1).all()
    for kv, name in ((0, "k"), (1, "v")):
        want = cache[0, kv].to(torch.float8_e4m3fn).view(torch.uint8)
        bad = (p[name].view(torch.uint8) != want).nonzero()
        assert bad.numel() == 0, f"{len(bad)} conversions differ, e.g. {cache[0, kv][tuple(bad[0])].item()!r}"
    # Decoding every byte (scale 1) gives torch's float8 -> float32, NaN codes included.
    p["k"].view(torch.uint8).view(-1)[:256] = torch.arange(256, dtype=torch.uint8, device=device)
    dec = torch.zeros_like(cache)
    mod.decode_triton(out, dec, (0, 1), ids, "fp8")
    got = dec[0, 0].reshape(-1)[:256]  # block ids 0..n-1: the cache's [n, t, h, d] is the payload's order
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().to(device)
    real = ~want.isnan()
    assert torch.equal(got.isnan(), ~real) and torch.equal(got[real], want[real])
    assert torch.equal(got[real].signbit(), want[real].signbit())  # -0.0 stays -0.0


def test_fp8_conversion_is_bit_exact(interp):
    check_fp8_bits(interp)


def test_rejects_bad_arguments(interp):
    cache = make_cache(torch.float32, layers=2, blocks=3)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="need"):
        interp.encode_triton(cache, (0, 2), ids, "int4", torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown KV codec"):
        interp.encode_triton(cache, (0, 2), ids, "int2", torch.zeros(10, dtype=torch.uint8))
    odd = torch.zeros(2, 2, 3, 12, 2, 32)
    with pytest.raises(ValueError, match="power-of-two"):
        interp.decode_triton(torch.zeros(10, dtype=torch.uint8), odd, (0, 1), ids, "int8")


def test_dispatch_is_cuda_only():
    assert not kv_quant_triton.available(torch.device("cpu"))


# --- GPU: compiled without a GPU, run with one ------------------------------------------------------


@pytest.mark.parametrize("arch", (90, 80))
def test_kernels_compile_for_nvidia(arch):
    """Type errors that only the compiler sees (the interpreter is plain Python) show up on a CPU box too."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, cache_arg, payload_arg in (
        (kv_quant_triton._encode_kernel, "cache_ptr", "out_ptr"),
        (kv_quant_triton._decode_kernel, "cache_ptr", "payload_ptr"),
    ):
        if not isinstance(kernel, triton.runtime.JITFunction):
            pytest.skip("TRITON_INTERPRET is set: the module's kernels are interpreted")
        for codec, bits in (("none", 0), ("fp8", 0), ("int8", 8), ("int4", 4)):
            constexprs = dict(T=16, D=128, CODEC=codec, BITS=bits, SOFT_FP8=arch < 89, SOFT_BF16=False)
            types = {cache_arg: "*bf16", payload_arg: "*u8", "block_ids_ptr": "*i64"}
            signature = {
                p.name: "constexpr" if p.is_constexpr else types.get(p.name, "i32") for p in kernel.params
            }
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs),
                target=GPUTarget("cuda", arch, 32),
                options={"enable_fp_fusion": False},
            )
            assert compiled.asm["cubin"]
            assert "fma.rn.f32" not in compiled.asm["ptx"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", ("none", *QUANTIZED))
def test_cuda_kernels_match_reference(codec, dtype):
    if not kv_quant_triton.available(torch.device("cuda")) or kv_quant_triton._interpreted():
        pytest.skip("compiled kernels unavailable")
    cache = make_cache(dtype, layers=4, blocks=64, h=8, d=128, device="cuda")
    src = torch.randperm(64, device="cuda")[:37]
    dst = torch.randperm(64, device="cuda")[:37]
    check_encode(kv_quant_triton, codec, cache, (1, 4), src)
    check_decode(kv_quant_triton, codec, cache, (1, 4), src, dst)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("native", (True, False), ids=("native-e4m3", "bit-manipulation"))
def test_cuda_fp8_conversion_is_bit_exact(native, monkeypatch):
    if kv_quant_triton._interpreted():
        pytest.skip("compiled kernels unavailable")
    if native and not kv_quant_triton._native_fp8(torch.device("cuda")):
        pytest.skip("no native e4m3 conversions on this GPU")
    monkeypatch.setattr(kv_quant_triton, "_native_fp8", lambda device: native)
    check_fp8_bits(kv_quant_triton, "cuda")
