"""The KV cache layout both sides must share, and its fingerprint.

A frame is only meaningful to a receiver whose cache has the same per-block tile
([block_size, num_kv_heads, head_dim] of `dtype`, engine/kv_cache.py) and the same model: K/V of
another model would decode into plausible-looking garbage. The fingerprint hashes everything that
must agree, so one header field catches a wrong model, dtype or block size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from engine.model_config import ModelConfig

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # float32 | bfloat16 | float16
    model: str = ""  # what identifies the weights (name and shape hash); part of the fingerprint

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"KV dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def of_cache(cls, model: ModelConfig, kv_cache: torch.Tensor) -> KVLayout:
        """The layout of an engine KV cache tensor [layers, 2, blocks, block_size, kv_heads, head_dim]."""
        layers, _, _, block_size, kv_heads, head_dim = kv_cache.shape
        identity = (
            f"{model.architecture}:{model.name}:{model.vocab_size}x{model.hidden_size}:"
            f"{model.num_layers}:{model.num_heads}/{model.num_kv_heads}:{model.rope_theta}"
        )
        return cls(layers, block_size, kv_heads, head_dim, DTYPE_NAMES[kv_cache.dtype], identity)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block_layer(self) -> int:
        """Bytes of K and V of one block in one layer, uncompressed."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def fingerprint(self) -> str:
        fields = (self.model, self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)
        text = "|".join(map(str, fields))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
