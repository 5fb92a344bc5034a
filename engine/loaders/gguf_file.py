"""A small GGUF reader: metadata as plain Python values and tensors as memory-mapped arrays.

The `gguf` package's reader builds a numpy view per metadata item and takes seconds on a 49k-token
vocabulary; this one parses the header with `struct` and maps only the tensor data. Dequantization
is still the `gguf` package's (`gguf.quants.dequantize` takes the arrays this returns).

File layout (little-endian, version 2 or 3)::

    "GGUF" u32 version | u64 n_tensors | u64 n_kv
    n_kv x      [string key | u32 type | value]            string = u64 length + utf-8 bytes
    n_tensors x [string name | u32 n_dims | u64 dims[n_dims] (fastest first) | u32 ggml type | u64 offset]
    padding to `general.alignment` (default 32), then tensor data at the offsets above
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import CorruptCheckpointError, UnsupportedModelError

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order (slowest first)
    data: np.ndarray  # what gguf.quants.dequantize expects: typed for float types, rows of bytes otherwise


class _Cursor:
    def __init__(self, buf: memoryview | bytes) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS and item_type != 7:
                dtype = np.dtype(_SCALARS[item_type])
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
                self.pos += n * dtype.itemsize
                return arr.tolist()
            return [self.value(item_type) for _ in range(n)]
        if vtype not in _SCALARS:
            raise struct.error(f"unknown metadata value type {vtype}")
        return self.unpack(_SCALARS[vtype])


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.metadata, self.tensors = self._parse(memoryview(self._map))
        except (OSError, ValueError, struct.error, IndexError, OverflowError) as exc:
            raise CorruptCheckpointError(
                f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
                "re-download or re-convert the checkpoint"
            ) from exc

    def _parse(self, buf: memoryview) -> tuple[dict[str, Any], list[GGUFTensor]]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        cur = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("missing GGUF magic bytes")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise UnsupportedModelError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        align = int(metadata.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        tensors = []
        for name, dims, ggml_type, offset in infos:
            try:
                qtype = GGMLQuantizationType(ggml_type)
            except ValueError:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name} has unknown ggml type {ggml_type}"
                ) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            shape = tuple(reversed(dims))
            n_bytes = int(np.prod(dims)) // block * type_size
            begin = start + offset
            if begin + n_bytes > len(buf):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated download?)")
            raw = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=begin)
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
                np_type = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[qtype.name]
                data = raw.view(np_type).reshape(shape)
            else:
                data = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
            tensors.append(GGUFTensor(name, ggml_type, shape, data))
        return metadata, tensors


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of the GGUF file at `path` (tensor data is mapped, not read)."""
    return GGUFFile(path).metadata
