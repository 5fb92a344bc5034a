"""The paged KV cache tensor and how its capacity is derived from a memory budget.

Layout (KV transfer moves these blocks, so this is a contract)::

    cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   dtype = model dtype
                        |                 \\_ one block of one layer: cache[l, 0, b] (K) and
                        K=0, V=1              cache[l, 1, b] (V), each a contiguous
                                              [block_size, num_kv_heads, head_dim] tile

    token at position p of a sequence with block table T lives at
    cache[l, :, T[p // block_size], p % block_size]

Blocks ids are shared by all layers: a sequence owns block b in every layer at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import InsufficientMemoryError, InvalidConfigError
from engine.model_config import ModelConfig

DEFAULT_BLOCK_SIZE = 16
DEFAULT_CPU_CACHE_BYTES = 1 << 30  # 1 GiB


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    memory_bytes: int | None = None  # KV budget; None = 1 GiB on CPU, `gpu_memory_utilization` on GPU
    gpu_memory_utilization: float = 0.90

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise InvalidConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise InvalidConfigError(f"KV cache memory_bytes must be positive, got {self.memory_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


def block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block id holds across all layers, K and V."""
    return model.kv_bytes_per_token(dtype.itemsize) * block_size


def kv_budget_bytes(cache: CacheConfig, device: torch.device) -> int:
    if cache.memory_bytes is not None:
        return cache.memory_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free
        return int(total * cache.gpu_memory_utilization) - used_by_others
    return DEFAULT_CPU_CACHE_BYTES


def num_blocks_for(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device) -> int:
    """How many blocks of `model`'s layout the budget holds."""
    return kv_budget_bytes(cache, device) // block_bytes(model, cache.block_size, dtype)


def allocate_kv_cache(
    model: ModelConfig,
    cache: CacheConfig,
    dtype: torch.dtype,
    device: torch.device,
    num_blocks: int | None = None,
) -> torch.Tensor:
    """The cache for the budget, or for exactly `num_blocks` blocks when given."""
    if num_blocks is None:
        num_blocks = num_blocks_for(model, cache, dtype, device)
    if num_blocks < 1:
        raise InsufficientMemoryError(
            f"the KV budget of {kv_budget_bytes(cache, device)} bytes holds no block of "
            f"{block_bytes(model, cache.block_size, dtype)} bytes; raise the cache memory"
        )
    shape = (model.num_layers, 2, num_blocks, cache.block_size, model.num_kv_heads, model.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
