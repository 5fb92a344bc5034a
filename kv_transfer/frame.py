"""The KV frame: the unit every transport moves. This module writes and checks its layout.

    offset   size  field
    0        4     magic  b"PDKV"
    4        4     H: header length, uint32 little-endian (at most MAX_HEADER_BYTES)
    8        H     header: a msgpack map, keys below
    8 + H    P     payload: P bytes, the codec's output for layers [layer_start, layer_end) and
                   KV heads [head_start, head_end) of the frame's blocks (kv_transfer.codecs
                   describes its inner layout), after the optional lossless stage

    header key   meaning
    v            wire format version (FORMAT_VERSION); another version is refused
    req          request id
    fp           fingerprint of model and cache layout (kv_transfer.layout.KVLayout.fingerprint)
    layers       [layer_start, layer_end), in the model's numbering
    heads        [head_start, head_end), the model's KV heads the payload carries (all of them
                 unless the two instances split heads differently: kv_transfer/resharding.py)
    blocks       the sender's block ids, in request order (diagnostics; the receiver's differ)
    first        index of blocks[0] within the request's block table; the receiver writes block i
                 of the frame into its own reserved block table[first + i]
    bs kvh hd    block size, the model's KV heads, head dim
    dtype        the cache dtype (float32 | bfloat16 | float16)
    codec        none | fp8 | int8 | int4
    scales       the codec's scale layout (kv_transfer.codecs), e.g. for fp8 "k,v:f32[block,head]";
                 it must match the receiver's own description of that codec
    lossless     "" | zstd | lz4
    raw          payload length before the lossless stage (P when lossless is "")
    plen         P
    ref          true: the payload is not a copy but layers [layer_start, layer_end) of the sender's
                 whole cache, read where it lies (a shared-memory cache the receiver mapped: the
                 one-copy path, codec none only); `blocks` are then the sender's blocks to copy
    src_blocks   ref frames: the sender cache's number of blocks (0 otherwise)
    src_heads    ref frames: [first, end) of the KV heads the sender's cache holds (= heads otherwise)
    csum alg     checksum of the P payload bytes and its algorithm: xxh3_64 for host payloads,
                 sum64 (position-weighted 64-bit word sum, computed on the device) for GPU ones;
                 without a lossless stage the host's xxh3_64 is computed piece by piece as the
                 codec writes (and reads) the payload (StreamingChecksum), the same value;
                 "none" for ref frames only (their bytes never travel)

Checks, in order, each with its own error: magic and header length (TruncatedFrameError,
FrameTooLargeError), msgpack and field types (FrameError), version (UnsupportedVersionError), codec
and lossless names (UnknownCodecError), layout and fingerprint (LayoutMismatchError /
FingerprintMismatchError, in kv_transfer.receiver), payload length (TruncatedFrameError),
checksum (ChecksumMismatchError).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack
import torch
import xxhash

from kernels.kv_quant import CODECS
from kv_transfer.errors import (
    ChecksumMismatchError,
    FrameError,
    FrameTooLargeError,
    TruncatedFrameError,
    UnknownCodecError,
    UnsupportedVersionError,
)

MAGIC = b"PDKV"
FORMAT_VERSION = 2  # 2: the head range (frames between instances of different layouts)
PREFIX = struct.Struct("<4sI")  # magic, header length
MAX_HEADER_BYTES = 1 << 20
LOSSLESS = ("", "zstd", "lz4")
CHECKSUMS = ("xxh3_64", "sum64", "none")
_MIX = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 (odd) as a signed 64-bit value

_FIELDS = {  # wire key -> (attribute, type)
    "v": ("version", int),
    "req": ("request_id", str),
    "fp": ("fingerprint", str),
    "layers": ("layers", list),
    "heads": ("heads", list),
    "blocks": ("block_ids", list),
    "first": ("first_block", int),
    "bs": ("block_size", int),
    "kvh": ("num_kv_heads", int),
    "hd": ("head_dim", int),
    "dtype": ("dtype", str),
    "codec": ("codec", str),
    "scales": ("scale_layout", str),
    "lossless": ("lossless", str),
    "raw": ("raw_len", int),
    "plen": ("payload_len", int),
    "ref": ("by_reference", bool),
    "src_blocks": ("src_blocks", int),
    "src_heads": ("src_heads", list),
    "csum": ("checksum", int),
    "alg": ("checksum_alg", str),
}


@dataclass(frozen=True)
class FrameHeader:
    version: int
    request_id: str
    fingerprint: str
    layers: tuple[int, int]
    heads: tuple[int, int]
    block_ids: tuple[int, ...]
    first_block: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    codec: str
    scale_layout: str
    lossless: str
    raw_len: int
    payload_len: int
    checksum: int
    checksum_alg: str
    by_reference: bool = False
    src_blocks: int = 0
    src_heads: tuple[int, int] | None = None  # None: the same as heads

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def layer_range(self) -> range:
        return range(*self.layers)

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def num_heads(self) -> int:
        """KV heads the payload carries."""
        return self.heads[1] - self.heads[0]

    def encode(self) -> bytes:
        """magic + header length + msgpack header: the frame's bytes before the payload."""
        fields = {key: getattr(self, attr) for key, (attr, _) in _FIELDS.items()}
        fields["src_heads"] = fields["src_heads"] or self.heads
        body = msgpack.packb(fields)
        return PREFIX.pack(MAGIC, len(body)) + body


def header_length(prefix: bytes | memoryview) -> int:
    """The header length a frame's first 8 bytes declare (checks the magic)."""
    if len(prefix) < PREFIX.size:
        raise TruncatedFrameError(f"a frame starts with {PREFIX.size} bytes, got {len(prefix)}")
    magic, length = PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise FrameError(f"not a KV frame: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if length > MAX_HEADER_BYTES:
        raise FrameTooLargeError(f"frame header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    return length


def decode_header(data: bytes | memoryview) -> FrameHeader:
    """Parse and type-check the header at the start of `data` (magic, length, msgpack map)."""
    length = header_length(data)
    if len(data) < PREFIX.size + length:
        raise TruncatedFrameError(
            f"the frame header declares {length} bytes but {len(data) - PREFIX.size} arrived"
        )
    try:
        raw = msgpack.unpackb(bytes(data[PREFIX.size : PREFIX.size + length]), strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise FrameError(f"frame header is not valid msgpack: {exc}") from exc
    if not isinstance(raw, dict):
        raise FrameError(f"frame header must be a map, got {type(raw).__name__}")
    request_id = raw.get("req") if isinstance(raw.get("req"), str) else None
    try:
        return _check_fields(raw)
    except FrameError as exc:
        exc.request_id = request_id  # so the receiver can fail that request's transfer
        raise


def _check_fields(raw: dict) -> FrameHeader:
    version = raw.get("v")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"KV frame format version {version!r}; this pdserve reads version {FORMAT_VERSION}"
        )
    missing = [k for k in _FIELDS if k not in raw]
    unknown = [k for k in raw if k not in _FIELDS]
    if missing or unknown:
        raise FrameError(f"frame header has missing keys {missing} / unknown keys {unknown}")
    values = {}
    for key, (attr, kind) in _FIELDS.items():
        value = raw[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise FrameError(f"frame header field {key!r} must be {kind.__name__}, got {value!r:.80}")
        values[attr] = value
    layers, heads, blocks = values["layers"], values["heads"], values["block_ids"]
    src_heads = values["src_heads"]
    for name, span in (("layer", layers), ("head", heads), ("sender head", src_heads)):
        if len(span) != 2 or not all(isinstance(x, int) for x in span) or not 0 <= span[0] < span[1]:
            raise FrameError(f"frame {name} range {span!r:.80} is not [start, end) with 0 <= start < end")
    if not blocks or not all(isinstance(b, int) and b >= 0 for b in blocks):
        raise FrameError("frame block ids must be a non-empty list of non-negative ints")
    for attr in ("first_block", "block_size", "num_kv_heads", "head_dim", "raw_len", "payload_len"):
        if values[attr] < (0 if attr in ("first_block", "raw_len", "payload_len") else 1):
            raise FrameError(f"frame header field {attr} out of range: {values[attr]}")
    if values["codec"] not in CODECS:
        raise UnknownCodecError(f"unknown KV codec {values['codec']!r}; known: {', '.join(CODECS)}")
    if values["lossless"] not in LOSSLESS:
        raise UnknownCodecError(f"unknown lossless stage {values['lossless']!r}; known: zstd, lz4")
    if values["checksum_alg"] not in CHECKSUMS:
        raise UnknownCodecError(f"unknown checksum {values['checksum_alg']!r}; known: {CHECKSUMS}")
    if heads[1] > values["num_kv_heads"]:
        raise FrameError(f"frame head range {heads} exceeds the model's {values['num_kv_heads']} KV heads")
    if values["by_reference"] != (values["checksum_alg"] == "none"):
        raise FrameError("only a frame read in place (ref) goes without a checksum, and it always does")
    if values["by_reference"] and (
        values["codec"] != "none" or values["lossless"] or values["src_blocks"] < 1
    ):
        raise FrameError("a frame read in place carries codec none, no lossless stage and src_blocks >= 1")
    values["layers"], values["heads"], values["block_ids"] = tuple(layers), tuple(heads), tuple(blocks)
    values["src_heads"] = tuple(src_heads)
    return FrameHeader(**values)


def peek_request_id(header: bytes | memoryview) -> str | None:
    """The request id a header names, read without validating anything else (None if unreadable).
    Transports use it to file a receiver's error under the right request."""
    try:
        raw = msgpack.unpackb(bytes(header[PREFIX.size :]))
    except (ValueError, msgpack.UnpackException):
        return None
    request_id = raw.get("req") if isinstance(raw, dict) else None
    return request_id if isinstance(request_id, str) else None


def payload_checksum(payload: torch.Tensor, alg: str) -> int:
    """Checksum of a uint8 payload: xxh3_64 on the host, sum64 on a GPU (no host round trip)."""
    if alg == "xxh3_64":
        return xxhash.xxh3_64_intdigest(payload.numpy() if payload.numel() else b"")
    if alg == "sum64":
        # Each 64-bit word goes through a bijection (odd multiply, xor-shift) and an odd,
        # position-dependent weight before the wrapping sum: changing any one word always changes
        # the sum, and swapped words almost always do.
        n = payload.numel()
        padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=payload.device)
        padded[:n] = payload
        words = padded.view(torch.int64) * _MIX
        words ^= (words >> 29) & ((1 << 35) - 1)  # a logical shift: x ^ (x >>> 29) is a bijection
        weights = torch.arange(words.numel(), dtype=torch.int64, device=payload.device) * 2 + 1
        return int(((words * weights).sum() + n).item()) & 0xFFFF_FFFF_FFFF_FFFF
    raise UnknownCodecError(f"unknown checksum {alg!r}")


def checksum_alg_for(payload: torch.Tensor) -> str:
    return "xxh3_64" if payload.device.type == "cpu" else "sum64"


class StreamingChecksum:
    """xxh3_64 fed with a payload's pieces in payload order: equal to payload_checksum over the
    whole payload. The reference codecs feed it each piece right after writing it (sender) or
    right before reading it (receiver), while the piece is still in the CPU's cache, so the
    checksum costs no extra pass over memory."""

    alg = "xxh3_64"

    def __init__(self) -> None:
        self._state = xxhash.xxh3_64()

    def update(self, piece: torch.Tensor) -> None:
        self._state.update(piece.reshape(-1).view(torch.uint8).numpy())

    def intdigest(self) -> int:
        return self._state.intdigest()


def streams_checksum(payload: torch.Tensor, lossless: str) -> bool:
    """Whether a payload's checksum can be computed while the codec runs: host payloads without a
    lossless stage (which checksums the compressed bytes)."""
    return not lossless and payload.device.type == "cpu"


def check_payload_length(header: FrameHeader, payload: torch.Tensor) -> None:
    if payload.numel() != header.payload_len:
        raise TruncatedFrameError(
            f"frame for {header.request_id!r} declares {header.payload_len} payload bytes, "
            f"{payload.numel()} arrived"
        )


def check_checksum(header: FrameHeader, checksum: int) -> None:
    if checksum != header.checksum:
        raise ChecksumMismatchError(
            f"frame for {header.request_id!r} (layers {header.layers[0]}-{header.layers[1] - 1}): "
            "payload checksum mismatch; the bytes were corrupted in transit"
        )


def verify_payload(header: FrameHeader, payload: torch.Tensor) -> None:
    """Length, then checksum; raises TruncatedFrameError / ChecksumMismatchError."""
    check_payload_length(header, payload)
    check_checksum(header, payload_checksum(payload, header.checksum_alg))
