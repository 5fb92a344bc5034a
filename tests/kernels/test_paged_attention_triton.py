"""The Triton paged attention and KV store (kernels/paged_attention_triton.py) against the plain-torch
references (kernels/paged_attention.py): on the CPU in Triton's interpreter on small shapes, compiled
for sm_90 / sm_80 without a GPU, and run on CUDA with one. Inputs are random and fresh every run;
tolerances are vLLM's for its Triton paged attention (bf16 atol 1.5e-2 / rtol 1e-2, fp8 KV 1.5e-1)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
import torch
import triton

from kernels import kv_quant_triton, paged_attention_triton
from kernels.paged_attention import (
    dequantize_kv,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    quantize_kv_rows,
    store_kv,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=1.5e-2, rtol=1e-2)}
FP8_TOLERANCE = dict(atol=1.5e-1, rtol=1e-2)  # quantized KV against the unquantized attention
QUANTIZED = (torch.float8_e4m3fn, torch.int8)


@pytest.fixture(scope="module")
def interp() -> ModuleType:
    """The kernel module decorated for Triton's interpreter (CPU tensors), over an interpreted copy
    of the codec kernels whose fp8 conversions it shares (see tests/kernels/test_kv_quant.py)."""

    def load(name: str, source: ModuleType) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, source.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    saved = sys.modules["kernels.kv_quant_triton"]
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        try:
            sys.modules["kernels.kv_quant_triton"] = load("_kv_quant_triton_interpreted", kv_quant_triton)
            module = load("_paged_attention_triton_interpreted", paged_attention_triton)
        finally:
            sys.modules["kernels.kv_quant_triton"] = saved
    assert module._interpreted()
    return module


def fresh_seed() -> int:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    print(f"seed {seed}")  # shown by pytest when the test fails
    return seed


def random_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen, device="cpu"):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen) * (1 + torch.rand(1, 1, kv_heads, head_dim, generator=gen) * 3)
    return k.to(device, dtype), torch.randn(shape, generator=gen).to(device, dtype)


def scattered_tables(lens, block_size, num_blocks, gen, width=None):
    """Each sequence's blocks, distinct and scattered over the cache; rows padded with random valid ids."""
    need = [-(-n // block_size) for n in lens]
    width = width or max(1, max(need))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    assert sum(need) <= num_blocks
    rows, start = [], 0
    for nb in need:
        pad = torch.randint(0, num_blocks, (width - nb,), generator=gen).tolist()
        rows.append(perm[start : start + nb] + pad)
        start += nb
    return torch.tensor(rows, dtype=torch.int32)


# Block-table edge cases: exactly on a block boundary, one token in the last block, one token,
# a length-0 padded row, and lengths of very different sizes in one batch.
DECODE_LENS = [[16], [17], [1], [32, 1, 0, 5], [3, 250, 64, 129, 1, 48]]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize(("num_heads", "kv_heads"), [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("lens", DECODE_LENS, ids=str)
@pytest.mark.parametrize("splits", (None, 1, 3))
def test_decode_matches_the_reference(interp, dtype, num_heads, kv_heads, lens, splits):
    gen = torch.Generator().manual_seed(fresh_seed())
    block_size, head_dim = 16, 32
    num_blocks = sum(-(-n // block_size) for n in lens) + 5
    k_cache, v_cache = random_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    tables = scattered_tables(lens, block_size, num_blocks, gen, width=17)  # room for 272 tokens
    context_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    got = interp.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, splits=splits)
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables.long(), context_lens.long(), scale)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert torch.all(got[context_lens == 0] == 0)


def test_split_count_fills_the_gpu_and_respects_the_minimum_split():
    cpu = torch.device("cpu")  # no GPU: the H100's 132 multiprocessors are assumed
    assert paged_attention_triton.num_splits(1, 8, 4096, cpu) == 4096 // 128  # capped by the split length
    assert paged_attention_triton.num_splits(64, 8, 4096, cpu) == 1  # 512 programs already
    assert paged_attention_triton.num_splits(4, 8, 8192, cpu) == 9  # two waves over 132
    assert paged_attention_triton.num_splits(1, 8, 100, cpu) == 1


@pytest.mark.parametrize("cache_dtype", QUANTIZED, ids=str)
@pytest.mark.parametrize("q_dtype", (torch.float32, torch.bfloat16), ids=str)
def test_decode_reads_a_quantized_cache(interp, cache_dtype, q_dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    block_size, kv_heads, head_dim, num_heads = 16, 2, 32, 8
    lens = [37, 16, 200, 1]
    num_blocks = 24
    k_full, v_full = random_cache(num_blocks, block_size, kv_heads, head_dim, torch.float32, gen)
    (k_codes, k_scale), (v_codes, v_scale) = (
        (c.view(num_blocks, block_size, kv_heads, head_dim), s.view(num_blocks, block_size, kv_heads))
        for c, s in (quantize_kv_rows(x.flatten(0, 1), cache_dtype) for x in (k_full, v_full))
    )
    tables = scattered_tables(lens, block_size, num_blocks, gen)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(q_dtype)
    scale = head_dim**-0.5
    got = interp.paged_decode_attention(
        q, k_codes, v_codes, tables, context_lens, scale, k_scale, v_scale, splits=2
    )
    want = paged_decode_attention_ref(
        q, k_codes, v_codes, tables.long(), context_lens.long(), scale, k_scale, v_scale
    )
    torch.testing.assert_close(got, want, **TOLERANCE[q_dtype])
    exact = paged_decode_attention_ref(q.float(), k_full, v_full, tables.long(), context_lens.long(), scale)
    torch.testing.assert_close(got.float(), exact, **FP8_TOLERANCE)


# (prefix, chunk length) per chunk: a fresh prompt, a prefix ending on a block boundary, a prefix
# with one token in its last block, a one-token chunk, and a chunk longer than a query tile.
PREFILL_CHUNKS = [[(0, 7)], [(16, 5), (17, 1)], [(0, 130), (33, 70), (0, 1)], [(5, 64), (100, 20)]]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize(("num_heads", "kv_heads"), [(8, 2), (9, 3)])
@pytest.mark.parametrize("chunks", PREFILL_CHUNKS, ids=str)
def test_prefill_matches_the_reference(interp, dtype, num_heads, kv_heads, chunks):
    gen = torch.Generator().manual_seed(fresh_seed())
    block_size, head_dim = 16, 32
    ends = [p + n for p, n in chunks]
    num_blocks = sum(-(-e // block_size) for e in ends) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    tables = scattered_tables(ends, block_size, num_blocks, gen)
    lens = torch.tensor([n for _, n in chunks], dtype=torch.int32)
    prefixes = torch.tensor([p for p, _ in chunks], dtype=torch.int32)
    starts = torch.cumsum(lens, 0, dtype=torch.int32) - lens
    q = torch.randn(int(lens.sum()), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    got = interp.paged_prefill_attention(
        q, k_cache, v_cache, tables, starts, lens, prefixes, int(lens.max()), scale
    )
    want = paged_prefill_attention_ref(q, k_cache, v_cache, tables.long(), starts, lens, prefixes, scale)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("cache_dtype", (torch.float32, torch.bfloat16, *QUANTIZED), ids=str)
def test_store_writes_exactly_the_references_slots_codes_and_scales(interp, cache_dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    num_blocks, block_size, kv_heads, head_dim, tokens = 6, 16, 3, 32, 20
    quantized = cache_dtype in QUANTIZED
    # the model hands K and V as strided views of one fused projection output
    qkv = torch.randn(tokens, (2 + 2 * kv_heads) * head_dim, generator=gen) * 4
    k = qkv[:, 2 * head_dim : (2 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (2 + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    if cache_dtype == torch.bfloat16:
        k, v = k.to(cache_dtype), v.to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[3, 11]] = -1  # padded rows write nothing
    shape = (num_blocks, block_size, kv_heads, head_dim)
    before = [torch.randn(shape, generator=gen).to(cache_dtype) for _ in "kv"]
    scales = [torch.ones(shape[:3]) for _ in "kv"] if quantized else [None, None]
    ours, theirs = [[t if t is None else t.clone() for t in before + scales] for _ in range(2)]
    interp.store_kv(ours[0], ours[1], slots, k, v, ours[2], ours[3])
    store_kv(theirs[0], theirs[1], slots, k, v, theirs[2], theirs[3])
    bits = lambda c: c.view(torch.uint8) if c.dtype == torch.float8_e4m3fn else c  # noqa: E731
    for got, want in zip(ours, theirs, strict=True):
        if got is not None:
            assert torch.equal(bits(got), bits(want))
    written = slots[slots >= 0]
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[written] = False
    for got, old in zip(ours[:2], before, strict=True):
        assert torch.equal(bits(got).flatten(0, 1)[untouched], bits(old).flatten(0, 1)[untouched])
    if quantized:  # the codes decode to within a quantization step of what was stored
        values = dequantize_kv(ours[0], ours[2]).flatten(0, 1)[written]
        stored = k.float()[slots >= 0]
        step = stored.abs().amax(-1, keepdim=True) / KV_QMAX[cache_dtype]
        bound = step * (0.5 if cache_dtype == torch.int8 else 32)  # e4m3: 3 mantissa bits near 448
        assert torch.all((values - stored).abs() <= bound * 1.001)


KV_QMAX = paged_attention_triton.KV_CACHE_QMAX


def test_bad_arguments_are_refused_by_name(interp):
    k_cache = torch.zeros(4, 16, 2, 32)
    q = torch.zeros(1, 8, 32)
    tables, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="needs float32 scales"):
        interp.paged_decode_attention(q, k_cache.to(torch.int8), k_cache.to(torch.int8), tables, lens, 1.0)
    with pytest.raises(ValueError, match="takes no scales"):
        interp.paged_decode_attention(q, k_cache, k_cache, tables, lens, 1.0, torch.ones(4, 16, 2), None)
    with pytest.raises(ValueError, match="7 query heads of dim 32 do not fit 2 KV heads"):
        interp.paged_decode_attention(torch.zeros(1, 7, 32), k_cache, k_cache, tables, lens, 1.0)


# --- GPU: compiled without a GPU, run with one ------------------------------------------------------


def signature(kernel, cache: str) -> dict[str, str]:
    """Argument types by name, as the launchers pass them (block tables and lengths int32)."""
    types = dict.fromkeys(("tables", "lens", "starts", "prefixes", "slot_mapping"), "*i32")
    types |= dict.fromkeys(("k_cache", "v_cache"), cache)
    types |= dict.fromkeys(("k_scale", "v_scale", "part_out", "part_lse"), "*fp32")
    types |= dict.fromkeys(("q", "k", "v", "out"), "*bf16") | {"scale": "fp32"}
    return {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "i32") for p in kernel.params}


@pytest.mark.parametrize("arch", (90, 80))
def test_kernels_compile_for_nvidia(arch):
    """Type and shape errors only the compiler sees (the interpreter is plain Python), on a CPU box too."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    m = paged_attention_triton
    if m._interpreted():
        pytest.skip("TRITON_INTERPRET is set: the module's kernels are interpreted")
    soft = arch < 89
    for quant, cache in ((0, "*bf16"), (1, "*u8" if soft else "*fp8e4nv"), (2, "*i8")):
        heads = dict(KVH=8, D=128, BLOCK_D=128, QUANT=quant, SOFT_FP8=soft)
        attn = dict(heads, H=32, GROUP=4, BLOCK_SIZE=16, PRECISION="tf32", DOT_F32=False)
        launches = [
            (m._decode_kernel, dict(attn, BLOCK_G=16, BLOCK_N=64, NUM_SPLITS=4)),
            (m._decode_kernel, dict(attn, BLOCK_G=16, BLOCK_N=64, NUM_SPLITS=1)),
            (m._prefill_kernel, dict(attn, BLOCK_M=64, BLOCK_N=64)),
            (m._store_kernel, dict(heads, BLOCK_H=8, QMAX=448.0)),
            (m._merge_kernel, dict(D=128, BLOCK_D=128, NUM_SPLITS=5, BLOCK_S=8)),
        ]
        for kernel, constexprs in launches:
            source = ASTSource(kernel, signature(kernel, cache), constexprs)
            assert triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["cubin"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cache_dtype", (torch.bfloat16, *QUANTIZED), ids=str)
@pytest.mark.parametrize("lens", [[4096], [1, 17, 700, 2048, 16, 33] * 11], ids=("long", "mixed-64"))
def test_cuda_kernels_match_reference(cache_dtype, lens):
    gen = torch.Generator().manual_seed(fresh_seed())
    block_size, kv_heads, head_dim, num_heads = 16, 8, 128, 32
    num_blocks = sum(-(-n // block_size) for n in lens) + 8
    k_full, v_full = random_cache(num_blocks, block_size, kv_heads, head_dim, torch.float32, gen)
    if cache_dtype in QUANTIZED:
        parts = [quantize_kv_rows(x.flatten(0, 1), cache_dtype) for x in (k_full, v_full)]
        (kc, ks), (vc, vs) = ((c.view(k_full.shape), s.view(k_full.shape[:3])) for c, s in parts)
    else:
        (kc, vc), ks, vs = (k_full.to(cache_dtype), v_full.to(cache_dtype)), None, None
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    tables = scattered_tables(lens, block_size, num_blocks, gen)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(torch.bfloat16)
    scale = head_dim**-0.5
    got = paged_attention_triton.paged_decode_attention(
        q.cuda(), cuda(kc), cuda(vc), tables.cuda(), context_lens.cuda(), scale, cuda(ks), cuda(vs)
    )
    want = paged_decode_attention_ref(q, kc, vc, tables.long(), context_lens.long(), scale, ks, vs)
    torch.testing.assert_close(got.cpu(), want, **TOLERANCE[torch.bfloat16])
