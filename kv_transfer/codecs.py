"""Which codec a transfer uses, how big its payloads are, and the calls that run it: the Triton
kernels on a GPU, the torch reference (kernels/kv_quant.py) on the CPU, then the optional lossless
stage (zstd or lz4, on the host) on top of any codec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.kv_quant import CODECS, OnPiece, decode_ref, encode_ref, layer_nbytes
from kv_transfer.errors import FrameError, UnknownCodecError
from kv_transfer.frame import LOSSLESS
from kv_transfer.layout import KVLayout

_SCALE_LAYOUTS = {
    "none": "",
    "fp8": "k,v:f32[block,head]",
    "int8": "k:f16[block,head,2]+u8[block,head,channel];v:f16[block,head,2]+u8[block,token,head]",
    "int4": "k:f16[block,head,2]+u8[block,head,channel];v:f16[block,head,2]+u8[block,token,head]",
}


@dataclass(frozen=True)
class CodecSpec:
    name: str = "none"  # none | fp8 | int8 | int4
    lossless: str = ""  # "" | zstd | lz4
    zstd_level: int = 1  # fast levels: the stage must keep up with the link

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise UnknownCodecError(f"unknown KV codec {self.name!r}; choose one of {', '.join(CODECS)}")
        if self.lossless not in LOSSLESS:
            raise UnknownCodecError(f"unknown lossless stage {self.lossless!r}; choose zstd, lz4 or none")

    @property
    def scale_layout(self) -> str:
        return _SCALE_LAYOUTS[self.name]

    def raw_nbytes(
        self, layout: KVLayout, num_blocks: int, num_layers: int, num_heads: int | None = None
    ) -> int:
        """Payload bytes before the lossless stage for `num_layers` layers of `num_blocks` blocks
        and `num_heads` KV heads (every head the layout's cache holds by default)."""
        t, h, d = layout.block_shape
        h = h if num_heads is None else num_heads
        return num_layers * layer_nbytes(self.name, num_blocks, t, h, d, layout.torch_dtype.itemsize)

    def compression_ratio(self, layout: KVLayout, num_blocks: int, baseline: torch.dtype) -> float:
        """Original KV bytes in `baseline` dtype over encoded bytes (scales included, lossless excluded)."""
        original = layout.bytes_per_block_layer // layout.torch_dtype.itemsize * baseline.itemsize
        return original * num_blocks / self.raw_nbytes(layout, num_blocks, 1)


def check_layout(spec: CodecSpec, layout: KVLayout) -> None:
    """Refuse a codec that cannot encode this layout (int4 packs pairs along head_dim)."""
    if spec.name == "int4" and layout.head_dim % 2:
        raise UnknownCodecError(f"int4 needs an even head_dim; this cache has {layout.head_dim}")


def _use_triton(spec: CodecSpec, cache: torch.Tensor) -> bool:
    """The Triton kernels run on GPUs for power-of-two block sizes and head dims over a whole
    cache tensor; else the reference (which also reads and writes a view of some of its KV heads,
    what a transfer between instances that split heads differently moves)."""
    _, _, _, block_size, _, head_dim = cache.shape
    pow2 = not (block_size & (block_size - 1) or head_dim & (head_dim - 1))
    return cache.is_cuda and spec.name != "none" and pow2 and cache.is_contiguous()


def encode(
    spec: CodecSpec,
    cache: torch.Tensor,
    layers: tuple[int, int],
    block_ids: torch.Tensor,
    out: torch.Tensor,
    on_piece: OnPiece | None = None,
) -> None:
    """Quantize + pack layers [a, b) of `block_ids` straight from `cache` into `out` (uint8, raw
    size). `on_piece` sees the bytes of `out` in order as they are written (a streaming checksum)."""
    if _use_triton(spec, cache):
        from kernels.kv_quant_triton import encode_triton

        encode_triton(cache, layers, block_ids, spec.name, out)
        if on_piece is not None:
            on_piece(out)
    else:
        encode_ref(cache, layers, block_ids, spec.name, out, on_piece)


def decode(
    spec: CodecSpec,
    payload: torch.Tensor,
    cache: torch.Tensor,
    layers: tuple[int, int],
    block_ids: torch.Tensor,
    on_piece: OnPiece | None = None,
) -> None:
    """Unpack + dequantize a raw payload straight into `cache` at `block_ids` (the receiver's
    blocks). `on_piece` sees the bytes of `payload` in order as they are read."""
    if on_piece is not None and (payload.device != cache.device or _use_triton(spec, cache)):
        on_piece(payload)
        on_piece = None
    payload = payload.to(cache.device, non_blocking=True)
    if _use_triton(spec, cache):
        from kernels.kv_quant_triton import decode_triton

        decode_triton(payload, cache, layers, block_ids, spec.name)
    else:
        decode_ref(payload, cache, layers, block_ids, spec.name, on_piece)


def compress(spec: CodecSpec, raw: torch.Tensor) -> torch.Tensor:
    """The lossless stage on a raw payload; returns `raw` itself when there is none."""
    if not spec.lossless:
        return raw
    data = raw.cpu().numpy()
    if spec.lossless == "zstd":
        import zstandard

        packed = zstandard.ZstdCompressor(level=spec.zstd_level).compress(data)
    else:
        import lz4.frame

        packed = lz4.frame.compress(data, store_size=True)
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8)


def decompress(lossless: str, payload: torch.Tensor, raw_len: int) -> torch.Tensor:
    """Undo the lossless stage; the result must be exactly `raw_len` bytes (FrameError otherwise).

    The caller has already checked `raw_len` against what the header's layout needs, and the size
    the compressed frame declares must equal it before anything is allocated, so a small forged
    payload cannot make the receiver allocate more than an honest frame would. Trailing bytes after
    the compressed frame are refused too."""
    if not lossless:
        return payload
    data = payload.cpu().numpy().tobytes()
    try:
        if lossless == "zstd":
            import zstandard

            declared = zstandard.frame_content_size(data)
            if declared != raw_len:
                raise FrameError(f"zstd payload declares {declared} bytes, the header says {raw_len}")
            stream = zstandard.ZstdDecompressor().decompressobj()
            raw = stream.decompress(data)
            trailing = len(stream.unused_data)
        else:
            import lz4.frame

            declared = lz4.frame.get_frame_info(data)["content_size"]
            if declared != raw_len:
                raise FrameError(f"lz4 payload declares {declared} bytes, the header says {raw_len}")
            raw, used = lz4.frame.decompress(data, return_bytes_read=True)
            trailing = len(data) - used
    except FrameError:
        raise
    except Exception as exc:  # noqa: BLE001 - each library raises its own error type
        raise FrameError(f"{lossless} payload does not decompress: {exc}") from exc
    if len(raw) != raw_len:
        raise FrameError(f"{lossless} payload decompresses to {len(raw)} bytes, the header says {raw_len}")
    if trailing:
        raise FrameError(f"{lossless} payload has {trailing} bytes after its compressed frame")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
