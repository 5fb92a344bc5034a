"""The KV cache layout both sides must share, and its fingerprint.

A frame is only meaningful to a receiver whose cache has the same per-block tile
([block_size, kv_heads, head_dim] of `dtype`, engine/kv_cache.py) and the same model: K/V of
another model would decode into plausible-looking garbage. The fingerprint hashes everything that
must agree, so one header field catches a wrong model, dtype or block size.

`num_layers` and `num_kv_heads` are the model's. The cache of one rank of a tensor- or
pipeline-parallel instance holds a rectangle of them, `layers` x `heads` (kv_transfer/resharding.py),
numbered from 0 in the rank's own tensor; the fingerprint leaves the rectangle out, so ranks of
instances with different layouts agree on it.
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
    layers: tuple[int, int] | None = None  # [first, end) of the model's layers this cache holds (all)
    heads: tuple[int, int] | None = None  # [first, end) of the model's KV heads this cache holds (all)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"KV dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name, total in (("layers", self.num_layers), ("heads", self.num_kv_heads)):
            span = getattr(self, name)
            if span is None:
                object.__setattr__(self, name, (0, total))
            elif not 0 <= span[0] < span[1] <= total:
                raise ValueError(f"{name} {span} is not a non-empty range within the model's {total}")
            else:
                object.__setattr__(self, name, tuple(span))

    @classmethod
    def of_cache(
        cls,
        model: ModelConfig,
        kv_cache: torch.Tensor,
        layers: range | None = None,
        heads: range | None = None,
    ) -> KVLayout:
        """The layout of an engine KV cache tensor [layers, 2, blocks, block_size, kv_heads, head_dim]
        holding the model's `layers` x `heads` (all of them by default)."""
        num_layers, _, _, block_size, num_heads, head_dim = kv_cache.shape
        layers = layers if layers is not None else range(model.num_layers)
        heads = heads if heads is not None else range(model.num_kv_heads)
        if (len(layers), len(heads)) != (num_layers, num_heads):
            raise ValueError(
                f"a cache of {num_layers} layers x {num_heads} KV heads cannot hold layers "
                f"{layers.start}-{layers.stop - 1} x heads {heads.start}-{heads.stop - 1}"
            )
        identity = (
            f"{model.architecture}:{model.name}:{model.vocab_size}x{model.hidden_size}:"
            f"{model.num_layers}:{model.num_heads}/{model.num_kv_heads}:{model.rope_theta}"
        )
        return cls(
            model.num_layers,
            block_size,
            model.num_kv_heads,
            head_dim,
            DTYPE_NAMES[kv_cache.dtype],
            identity,
            (layers.start, layers.stop),
            (heads.start, heads.stop),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def layer_range(self) -> range:
        """The model's layers this cache holds (its layer i is the model's layer_range[i])."""
        return range(*self.layers)

    @property
    def head_range(self) -> range:
        return range(*self.heads)

    @property
    def num_local_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def num_local_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def is_whole(self) -> bool:
        """Whether this cache holds every layer and KV head of the model."""
        return self.layers == (0, self.num_layers) and self.heads == (0, self.num_kv_heads)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V) in this cache: [block_size, heads held, head_dim]."""
        return (self.block_size, self.num_local_heads, self.head_dim)

    @property
    def bytes_per_block_layer(self) -> int:
        """Bytes of K and V of one block in one layer of this cache, uncompressed."""
        return 2 * self.block_size * self.num_local_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def fingerprint(self) -> str:
        fields = (self.model, self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)
        text = "|".join(map(str, fields))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
