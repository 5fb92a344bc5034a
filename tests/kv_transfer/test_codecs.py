"""Codec round trips on the engine's cache layout: exact for none, bounded error for the others,
the documented payload sizes, and the lossless stages on top."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_quant import CODECS, decode_ref, encode_ref, layer_nbytes
from kv_transfer import codecs
from kv_transfer.codecs import CodecSpec
from kv_transfer.errors import FrameError, UnknownCodecError
from kv_transfer.layout import KVLayout

L, N, T, H, D = 3, 12, 16, 2, 64


def make_cache(dtype=torch.float32, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Keys with per-channel offsets (the outlier channels KIVI/KVQuant describe), values plain.
    cache = torch.randn(L, 2, N, T, H, D, generator=gen)
    cache[:, 0] += 4 * torch.randn(1, 1, 1, H, D, generator=gen)
    return cache.to(dtype)


def round_trip(cache: torch.Tensor, codec: str, src: list[int], dst: list[int], layers=(0, L)):
    out = torch.zeros_like(cache)
    n = layer_nbytes(codec, len(src), T, H, D, cache.element_size()) * (layers[1] - layers[0])
    payload = torch.empty(n, dtype=torch.uint8)
    encode_ref(cache, layers, torch.tensor(src), codec, payload)
    decode_ref(payload, out, layers, torch.tensor(dst), codec)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_none_is_exact_and_lands_in_the_destination_blocks(dtype):
    cache = make_cache(dtype)
    src, dst = [7, 2, 9], [0, 11, 4]
    out = round_trip(cache, "none", src, dst, layers=(1, 3))
    assert torch.equal(out[1:3][:, :, dst], cache[1:3][:, :, src])
    untouched = [b for b in range(N) if b not in dst]
    assert not out[:, :, untouched].any() and not out[0].any()


@pytest.mark.parametrize(
    ("codec", "rel_tol"), [("fp8", 0.07), ("int8", 0.01), ("int4", 0.15)]
)  # worst element error relative to the tile's range
def test_lossy_codecs_error_is_bounded_per_tile(codec, rel_tol):
    cache = make_cache()
    src = list(range(N))
    out = round_trip(cache, codec, src, src)
    err = (out - cache).abs().amax(dim=(3, 5))  # [L, 2, N, H] worst error per (block, head) tile
    span = cache.amax(dim=(3, 5)) - cache.amin(dim=(3, 5))
    assert (err <= rel_tol * span).all(), (err / span).max()


def test_int_codecs_keys_are_per_channel_values_per_token():
    """A key channel that is constant within a block, however large, comes back nearly exact: the
    per-channel grid collapses onto it. The same holds for a constant value token."""
    cache = make_cache()
    cache[:, 0, :, :, 0, 5] = 37.25  # one key channel constant over each block's tokens
    cache[:, 1, :, 3, 1, :] = -2.5  # one value token constant over head_dim
    for codec in ("int8", "int4"):
        out = round_trip(cache, codec, list(range(N)), list(range(N)))
        span = cache[:, 0, :, :, 0].amax() - cache[:, 0, :, :, 0].amin()
        assert (out[:, 0, :, :, 0, 5] - 37.25).abs().max() <= span / 15 / (2 ** int(codec[3:]) - 1) + 1e-3
        assert (out[:, 1, :, 3, 1, :] + 2.5).abs().max() < 0.02


@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
def test_constant_and_zero_tiles_do_not_make_nan(codec):
    cache = torch.zeros(L, 2, N, T, H, D)
    cache[:, :, 1] = 3.0
    out = round_trip(cache, codec, [0, 1], [0, 1])
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, :, :2], cache[:, :, :2], atol=0.2)


def test_payload_sizes_and_compression_ratios():
    smol = KVLayout(30, 16, 3, 64, "bfloat16", "smollm2")
    llama8b = KVLayout(32, 16, 8, 128, "bfloat16", "llama-3.1-8b")
    assert CodecSpec("none").compression_ratio(llama8b, 64, torch.bfloat16) == 1.0
    ratios = {c: CodecSpec(c).compression_ratio(llama8b, 64, torch.bfloat16) for c in CODECS}
    assert ratios["fp8"] > 1.99 and ratios["int8"] > 1.9 and ratios["int4"] > 3.7
    assert CodecSpec("int4").compression_ratio(smol, 64, torch.bfloat16) > 3.65
    # int4: values half a byte, plus per-block ranges and one code byte per key channel / value token.
    t, h, d, n = 16, 8, 128, 4
    assert (
        layer_nbytes("int4", n, t, h, d, 2) == 2 * n * h * 4 + n * h * d + n * t * h + 2 * n * t * h * d // 2
    )


@pytest.mark.parametrize("stage", ["zstd", "lz4"])
def test_lossless_stage_round_trips_exactly(stage):
    layout = KVLayout(L, T, H, D, "float32", "m")
    cache = make_cache()
    spec = CodecSpec("int8", stage)
    raw = torch.empty(spec.raw_nbytes(layout, 3, L), dtype=torch.uint8)
    codecs.encode(spec, cache, (0, L), torch.tensor([1, 2, 3]), raw)
    packed = codecs.compress(spec, raw)
    assert torch.equal(codecs.decompress(stage, packed, raw.numel()), raw)
    with pytest.raises(FrameError, match="decompress|declares|says"):
        codecs.decompress(stage, packed, raw.numel() + 1)
    with pytest.raises(FrameError):
        codecs.decompress(stage, packed[: packed.numel() // 2], raw.numel())


def test_unknown_codec_names_are_rejected():
    with pytest.raises(UnknownCodecError, match="int3"):
        CodecSpec("int3")
    with pytest.raises(UnknownCodecError, match="brotli"):
        CodecSpec("int8", "brotli")


def test_device_checksum_catches_every_single_bit_flip():
    from kv_transfer.frame import payload_checksum

    payload = torch.randint(0, 256, (1024,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    base = payload_checksum(payload, "sum64")
    for i in range(payload.numel()):
        for bit in range(8):
            flipped = payload.clone()
            flipped[i] ^= 1 << bit
            assert payload_checksum(flipped, "sum64") != base, (i, bit)
    swapped = payload.clone()
    swapped[:8], swapped[8:16] = payload[8:16], payload[:8]
    assert payload_checksum(swapped, "sum64") != base


@pytest.mark.parametrize("codec", CODECS)
def test_pieces_cover_the_payload_once_in_order_and_stream_its_checksum(codec, monkeypatch):
    """The streaming checksum's contract: encode hands out every payload byte once, in order, after
    writing it; decode hands out the same bytes before reading them; both digests equal the
    one-shot checksum, and decoding with pieces writes what decoding without them does."""
    import kernels.kv_quant as kv_quant
    from kv_transfer.frame import StreamingChecksum, payload_checksum

    monkeypatch.setattr(kv_quant, "PIECE_BYTES", 3 * T * H * D * 4)  # 3 blocks: several pieces per layer
    cache = make_cache()
    src, dst = [7, 2, 9, 0, 5, 11, 1], [3, 0, 8, 10, 6, 1, 2]
    n = layer_nbytes(codec, len(src), T, H, D, cache.element_size()) * L
    payload = torch.full((n,), 0xEE, dtype=torch.uint8)
    written: list[tuple[int, bytes]] = []

    def on_written(piece: torch.Tensor) -> None:
        flat = piece.reshape(-1).view(torch.uint8)
        written.append((flat.data_ptr() - payload.data_ptr(), flat.numpy().tobytes()))

    encode_ref(cache, (0, L), torch.tensor(src), codec, payload, on_written)
    offsets = [offset for offset, _ in written]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert b"".join(data for _, data in written) == payload.numpy().tobytes()  # final bytes, all of them
    if codec == "none":
        assert len(written) > 2 * L  # pieces, not whole layers

    sent = StreamingChecksum()
    for _, data in written:
        sent.update(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    read = StreamingChecksum()
    streamed, plain = torch.zeros_like(cache), torch.zeros_like(cache)
    decode_ref(payload, streamed, (0, L), torch.tensor(dst), codec, read.update)
    decode_ref(payload, plain, (0, L), torch.tensor(dst), codec)
    assert sent.intdigest() == read.intdigest() == payload_checksum(payload, "xxh3_64")
    assert torch.equal(streamed, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_blocks_matches_index_copy_on_every_path(dtype):
    from kernels.kv_quant import scatter_blocks

    cache = make_cache(dtype)
    ids = torch.tensor([9, 0, 4, 11])
    src = make_cache(dtype, seed=1)[0, 0, :4]
    want = cache[1, 1].clone().index_copy_(0, ids, src)
    fast = cache[1, 1].clone()
    scatter_blocks(fast, ids, src)  # rows of whole int64 words: numpy's row copy
    assert torch.equal(fast, want)
    odd = torch.zeros(N, 3, 1, 1, dtype=dtype)  # 3-element rows are not whole words: index_copy_
    scatter_blocks(odd, ids, torch.ones(4, 3, 1, 1, dtype=dtype))
    assert odd[ids].eq(1).all() and odd.sum() == 12
