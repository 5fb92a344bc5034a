"""The engine's settings in one validated, frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import InvalidConfigError
from engine.kv_cache import DEFAULT_BLOCK_SIZE, CacheConfig
from engine.scheduler import SchedulerConfig

ATTENTION_BACKENDS = ("auto", "paged", "grouped")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_memory: int | None = None  # bytes for the KV cache; None = the device's default
    gpu_memory_utilization: float = 0.90
    # CPU: the KV cache in shared memory, so a decode worker on the node copies blocks straight
    # out of it (the one-copy KV transfer over shm; engine/kv_cache.py)
    shared_kv_cache: bool = False
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_prefill_chunk: int | None = None  # None: a prompt's chunk is bounded by the step's budget only
    max_model_len: int | None = None  # None = the model's own context
    seed: int = 0  # seeds dummy:<preset> random weights; sampling seeds are per request
    onednn_linear: bool = True  # CPU only: linear layers through oneDNN with packed weights
    # Ranks of one engine (vLLM's names): tensor parallel splits heads and MLP over processes
    # (one GPU each, or CPU processes sharing the cores), pipeline parallel splits the layers into
    # stages that micro-batches flow through; tp*pp ranks in all (engine/parallel).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Attention over the paged cache: "paged" attends each phase in one call from block tables and
    # lengths (Triton kernels on CUDA, their torch references elsewhere); "grouped" is the CPU path
    # (decode rows grouped by length, padded per group); "auto": paged on CUDA, grouped on the CPU.
    attention_backend: str = "auto"
    # CUDA only: decode-only steps replayed from CUDA graphs captured at bucketed batch sizes
    # (engine/cuda_graphs.py); ignored on the CPU and with tensor or pipeline parallelism.
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        name = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if name != "auto" and name not in DTYPES:
            raise InvalidConfigError(
                f"dtype {self.dtype!r} is not supported; choose auto, {', '.join(DTYPES)}"
            )
        object.__setattr__(self, "dtype", name)
        _check_device(self.device)
        if self.kv_cache_memory is not None and (
            isinstance(self.kv_cache_memory, bool) or not isinstance(self.kv_cache_memory, int)
        ):
            raise InvalidConfigError(
                f"kv_cache_memory is a number of bytes (int), got {type(self.kv_cache_memory).__name__}"
            )
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            choices = ", ".join(ATTENTION_BACKENDS)
            raise InvalidConfigError(
                f"attention_backend must be one of {choices}, got {self.attention_backend!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        self.cache, self.scheduler  # noqa: B018 - validate the derived configs now, not at first use

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidConfigError(f"device {self.device!r} was asked for but this machine has no CUDA GPU")
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @property
    def paged_attention(self) -> bool:
        """Whether attention runs from block tables and lengths (see `attention_backend`)."""
        if self.attention_backend == "auto":
            return self.torch_device.type == "cuda"
        return self.attention_backend == "paged"

    @property
    def cache(self) -> CacheConfig:
        return CacheConfig(
            self.block_size, self.kv_cache_memory, self.gpu_memory_utilization, self.shared_kv_cache
        )

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_prefill_chunk)


def _check_device(device: str) -> None:
    """Reject device strings torch cannot parse or that pdserve does not run on, before any work."""
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise InvalidConfigError(f"device {device!r} is not supported; choose auto, cpu, cuda or cuda:N")
