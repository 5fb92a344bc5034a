"""The paged KV cache tensor and how its capacity is derived from a memory budget.

Layout (KV transfer moves these blocks, so this is a contract)::

    cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   dtype = model dtype
                        |                 \\_ one block of one layer: cache[l, 0, b] (K) and
                        K=0, V=1              cache[l, 1, b] (V), each a contiguous
                                              [block_size, num_kv_heads, head_dim] tile

    token at position p of a sequence with block table T lives at
    cache[l, :, T[p // block_size], p % block_size]

Blocks ids are shared by all layers: a sequence owns block b in every layer at once.

A CPU cache can live in shared memory (`CacheConfig.shared`: a memfd segment): a decode worker on
the same node then maps it and copies a request's blocks straight out of it, one copy in all
(kv_transfer/transports/shm.py), instead of the two a staged frame costs.
"""

from __future__ import annotations

import mmap
import os
import weakref
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
    shared: bool = False  # CPU: in a shared-memory segment another process on the node can map

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
    if cache.shared and device.type == "cpu":
        return shared_zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


_SEGMENTS: dict[int, tuple[int, int]] = {}  # first byte's address -> (memfd, bytes) of shared caches


def shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in a memfd segment (fresh memfd pages are zero), mapped shared; the
    descriptor stays open (for `shared_segment`) until the tensor is collected."""
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    fd = os.memfd_create("pdserve-kv-cache", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise
    tensor = torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).view(shape)  # keeps `mapping`
    address = tensor.data_ptr()
    _SEGMENTS[address] = (fd, nbytes)
    weakref.finalize(tensor, _release_segment, address, fd)
    return tensor


def _release_segment(address: int, fd: int) -> None:
    _SEGMENTS.pop(address, None)
    os.close(fd)


def shared_segment(tensor: torch.Tensor) -> tuple[int, int, int] | None:
    """(memfd, offset of `tensor`'s first byte in it, the segment's bytes) when `tensor` is a view
    of a shared cache (`CacheConfig.shared`), else None."""
    if tensor.device.type != "cpu":
        return None
    address = tensor.data_ptr()
    for start, (fd, nbytes) in _SEGMENTS.items():
        if start <= address < start + nbytes:
            return fd, address - start, nbytes
    return None
