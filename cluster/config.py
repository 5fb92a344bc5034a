"""The deployment config file: SLO-driven YAML, validated on load.

    model:        what to serve (name or path, dtype, device, context length)
    slo:          TTFT and TPOT targets and the fraction of requests that must meet both
    prefill:      the prefill pool (instances, tensor/pipeline parallel, token budget, chunk size)
    decode:       the decode pool (instances, tensor/pipeline parallel, max batch)
    colocated:    the colocated baseline instead of the two pools: replicas that prefill and decode
                  in one engine (chunked prefills mixed with decodes), batching as set above
    kv_transfer:  how KV moves from prefill to decode (transport, codec, lossless stage, layer-wise)
    server:       front ends (ports, auth token, queue bound, limits)
    placement:    who chose the pools above: `manual` (this file) or `auto` (the optimizer)

Every section is a frozen dataclass; `load_config(path)` builds them from YAML and rejects, with
the key's dotted path and what is allowed: an unknown key, a value of the wrong type, and a value
that cannot work (a negative port, tensor parallel on a CPU, an attainment above 1). Values left
out take the defaults below, which describe the local CPU deployment (configs/local.yaml).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.errors import PDServeError


class ConfigError(PDServeError, ValueError):
    """The config file is unreadable or a key in it is unknown, mistyped or impossible."""


class _Invalid(Exception):
    """Raised by a section's checks with the key (relative to the section) that is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise _Invalid(key, message)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ByteSize(int):
    """A number of bytes, written as an integer or with a unit: 512MiB, 2GiB, 1.5GB."""


def _parse_size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise TypeError("expected a size in bytes such as 268435456, 256MiB or 2GiB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


# --- sections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSection:
    name: str = "smollm2-135m"  # a HF checkpoint dir, a .gguf file, smollm2-135m or dummy:<preset>
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = None  # None: the model's own context

    def check(self) -> None:
        _require(bool(self.name.strip()), "name", "must name a model")
        _require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")


@dataclass(frozen=True)
class SLOSection:
    ttft_ms: float = 2000.0  # time to first token, per request
    tpot_ms: float = 200.0  # time per output token after the first
    attainment: float = 0.9  # fraction of requests that must meet both

    def check(self) -> None:
        _require(self.ttft_ms > 0, "ttft_ms", f"must be > 0 milliseconds, got {self.ttft_ms}")
        _require(self.tpot_ms > 0, "tpot_ms", f"must be > 0 milliseconds, got {self.tpot_ms}")
        _require(0 < self.attainment <= 1, "attainment", f"must be in (0, 1], got {self.attainment}")


def _check_parallelism(pool: PrefillSection | DecodeSection | ColocatedSection) -> None:
    _require(_power_of_two(pool.tp), "tp", f"tensor parallel must be a power of two >= 1, got {pool.tp}")
    _require(pool.pp >= 1, "pp", f"pipeline parallel must be >= 1, got {pool.pp}")
    _require(pool.cpus > 0, "cpus", f"must be > 0, got {pool.cpus}")


def _check_pool(pool: PrefillSection | DecodeSection) -> None:
    _require(pool.instances >= 1, "instances", f"must be >= 1, got {pool.instances}")
    _check_parallelism(pool)
    _require(
        pool.kv_cache_memory is None or pool.kv_cache_memory > 0,
        "kv_cache_memory",
        f"must be a positive size, got {pool.kv_cache_memory}",
    )


@dataclass(frozen=True)
class PrefillSection:
    instances: int = 1
    tp: int = 1  # tensor parallel: GPUs one instance splits each layer over
    pp: int = 1  # pipeline parallel: stages one instance splits its layers into
    max_num_batched_tokens: int = 2048  # token budget of one prefill batch
    chunk_size: int = 512  # prompts longer than this are prefilled in chunks
    cpus: float = 1.0  # CPU cores reserved per instance
    kv_cache_memory: ByteSize | None = None  # None: the device's default

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    def check(self) -> None:
        _check_pool(self)
        _require(self.chunk_size >= 1, "chunk_size", f"must be >= 1, got {self.chunk_size}")
        _require(
            self.max_num_batched_tokens >= self.chunk_size,
            "max_num_batched_tokens",
            f"the batch token budget ({self.max_num_batched_tokens}) must hold at least one chunk "
            f"({self.chunk_size})",
        )


@dataclass(frozen=True)
class DecodeSection:
    instances: int = 1
    tp: int = 1
    pp: int = 1
    max_batch: int = 64  # sequences decoded together per step
    cpus: float = 1.0
    kv_cache_memory: ByteSize | None = None

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    def check(self) -> None:
        _check_pool(self)
        _require(self.max_batch >= 1, "max_batch", f"must be >= 1, got {self.max_batch}")


@dataclass(frozen=True)
class ColocatedSection:
    """`instances` > 0 runs that many colocated replicas behind the router instead of the prefill
    and decode pools (the baseline disaggregation is measured against). Each replica's engine
    batches with the settings a colocated plan simulates: the prefill section's token budget and
    chunk size, the decode section's max batch and KV memory."""

    instances: int = 0  # 0: disaggregated (the prefill and decode pools)
    tp: int = 1
    pp: int = 1
    cpus: float = 1.0  # CPU cores reserved per replica

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    def check(self) -> None:
        _require(self.instances >= 0, "instances", f"must be >= 0 (0: disaggregated), got {self.instances}")
        _check_parallelism(self)


@dataclass(frozen=True)
class KVTransferSection:
    transport: Literal["auto", "local", "shm", "grpc", "ray"] = "auto"  # auto: shm on a node, else grpc
    codec: Literal["none", "fp8", "int8", "int4"] = "none"
    lossless: Literal["none", "zstd", "lz4"] = "none"
    layerwise: bool = True  # send each layer as prefill finishes it
    lease_seconds: float = 30.0  # prefill holds a request's blocks at most this long unacknowledged
    max_frame_bytes: ByteSize = ByteSize(32 << 20)

    def check(self) -> None:
        _require(self.lease_seconds > 0, "lease_seconds", f"must be > 0, got {self.lease_seconds}")
        _require(self.max_frame_bytes >= 4096, "max_frame_bytes", "must be at least 4KiB")


@dataclass(frozen=True)
class ServerSection:
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    auth_token: str | None = None  # clients and KV-transfer peers must present it when set
    max_queue: int = 256  # requests waiting past this get RESOURCE_EXHAUSTED / 429
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    request_timeout_s: float = 600.0

    def check(self) -> None:
        for key in ("grpc_port", "http_port"):
            port = getattr(self, key)
            _require(0 <= port <= 65535, key, f"must be a TCP port (0-65535; 0 = any free), got {port}")
        _require(
            self.grpc_port != self.http_port or self.grpc_port == 0,
            "http_port",
            f"must differ from grpc_port ({self.grpc_port})",
        )
        token_ok = self.auth_token is None or len(self.auth_token) >= 8
        _require(token_ok, "auth_token", "use 8 characters or more")
        _require(self.max_queue >= 1, "max_queue", f"must be >= 1, got {self.max_queue}")
        _require(self.max_tokens_limit >= 1, "max_tokens_limit", f"must be >= 1, got {self.max_tokens_limit}")
        _require(self.request_timeout_s > 0, "request_timeout_s", "must be > 0 seconds")


@dataclass(frozen=True)
class PlacementSection:
    mode: Literal["manual", "auto"] = "manual"  # auto: the optimizer rewrites the pools from the SLOs
    # DistServe's searches (high / low node affinity), the colocated baseline, or all three
    algorithm: Literal["all", "high_affinity", "low_affinity", "colocated"] = "all"
    max_gpus: int | None = None  # the budget auto may use; None: every GPU of the cluster
    plan: str | None = None  # a plan file from `pdserve plan`: its pools replace the sections above
    # The cluster the plan is for (`pdserve plan`; `serve` uses what Ray reports).
    gpu: str = "cpu"  # a100-80gb | h100-80gb | h200 | l4 | cpu (one core per "GPU")
    nodes: int = 1
    gpus_per_node: int = 2
    inter_node_bandwidth: ByteSize = ByteSize(25 * 10**9)  # bytes/s between nodes
    # The traffic: a preset (chatbot | code | summarization) or a JSON-lines trace, at `rate`.
    workload: str = "chatbot"
    trace: str | None = None
    # Input and output lengths times this (the preset's or the trace's), for hardware too slow or
    # fast for the real lengths; `pdserve bench --length-scale` sends the same scaled traffic.
    length_scale: float = 1.0
    rate: float | None = None  # requests/s to plan for; None: as high as the GPU budget allows
    codecs: tuple[str, ...] = ()  # KV codecs the search may pick; empty: kv_transfer.codec only
    profile: str | None = None  # a `pdserve profile` file; it replaces the roofline on its hardware
    num_requests: int = 4000  # requests per simulated workload sample (the longest simulated run)
    seed: int = 0

    def check(self) -> None:
        _require(self.max_gpus is None or self.max_gpus >= 1, "max_gpus", "must be >= 1")
        _require(self.nodes >= 1, "nodes", f"must be >= 1, got {self.nodes}")
        _require(self.gpus_per_node >= 1, "gpus_per_node", f"must be >= 1, got {self.gpus_per_node}")
        _require(self.inter_node_bandwidth > 0, "inter_node_bandwidth", "must be a positive size per second")
        _require(self.rate is None or self.rate > 0, "rate", f"must be > 0 requests/s, got {self.rate}")
        _require(
            math.isfinite(self.length_scale) and self.length_scale > 0,
            "length_scale",
            f"must be a positive number, got {self.length_scale}",
        )
        codecs = ("none", "fp8", "int8", "int4")
        unknown = [c for c in self.codecs if c not in codecs]
        _require(not unknown, "codecs", f"unknown codec {unknown[:1]}; allowed: {', '.join(codecs)}")
        _require(self.num_requests >= 100, "num_requests", f"must be >= 100, got {self.num_requests}")


@dataclass(frozen=True)
class ClusterConfig:
    model: ModelSection = field(default_factory=ModelSection)
    slo: SLOSection = field(default_factory=SLOSection)
    prefill: PrefillSection = field(default_factory=PrefillSection)
    decode: DecodeSection = field(default_factory=DecodeSection)
    colocated: ColocatedSection = field(default_factory=ColocatedSection)
    kv_transfer: KVTransferSection = field(default_factory=KVTransferSection)
    server: ServerSection = field(default_factory=ServerSection)
    placement: PlacementSection = field(default_factory=PlacementSection)

    @property
    def is_colocated(self) -> bool:
        return self.colocated.instances > 0

    @property
    def pools(self) -> dict[str, PrefillSection | DecodeSection | ColocatedSection]:
        """The pools `serve` starts, by role: colocated replicas, or prefill and decode."""
        if self.is_colocated:
            return {"colocated": self.colocated}
        return {"prefill": self.prefill, "decode": self.decode}

    @property
    def num_gpus(self) -> int:
        """GPUs the pools ask for (0 on the CPU)."""
        if self.model.device == "cpu":
            return 0
        return sum(pool.instances * pool.gpus_per_instance for pool in self.pools.values())

    def check(self) -> None:
        """Rules that span sections."""
        budget = self.placement.max_gpus
        _require(
            self.placement.mode == "auto" or budget is None or self.num_gpus <= budget,
            "placement.max_gpus",
            f"the pools ask for {self.num_gpus} GPUs, more than the budget of {budget}",
        )

    def check_servable(self) -> None:
        """What `pdserve serve` cannot run although the file is valid (`pdserve plan` still reads
        it): a tensor- or pipeline-parallel pool in a disaggregated deployment whose KV transport
        cannot reach every rank (each rank sends or receives its own part of the KV over shm or
        gRPC; `local` is one process and the ranks are not Ray workers)."""
        if self.is_colocated or self.kv_transfer.transport in ("auto", "shm", "grpc"):
            return
        for pool in ("prefill", "decode"):
            section = getattr(self, pool)
            if section.tp * section.pp > 1:
                raise ConfigError(
                    f"kv_transfer.transport: {pool}.tp={section.tp} x {pool}.pp={section.pp} moves each "
                    f"rank's part of the KV over its own link, which the {self.kv_transfer.transport!r} "
                    "transport cannot do; use auto, shm or grpc"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (sizes as ints): what `yaml.safe_dump` and JSON can write."""
        sections = dataclasses.asdict(self).items()
        return {name: {k: _plain(v) for k, v in values.items()} for name, values in sections}


# --- loading ------------------------------------------------------------------------------------


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a config file; raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return config_from_dict({} if data is None else data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_from_dict(data: Any) -> ClusterConfig:
    return _build(ClusterConfig, data, "")


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"{key}: unknown key; allowed here: {', '.join(names)}")
    values = {name: _convert(hints[name], data[name], f"{path}.{name}" if path else name) for name in data}
    obj = cls(**values)
    try:
        obj.check()
    except _Invalid as exc:
        key = f"{path}.{exc.key}" if path else exc.key
        raise ConfigError(f"{key}: {exc}") from None
    return obj


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"{path}: {value!r} is not one of: {allowed}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is ByteSize:
        try:
            return ByteSize(_parse_size(value))
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}, got {_describe(value)}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"config field {path} has an unsupported type {hint!r}")  # a bug in this module


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return int(value) if isinstance(value, ByteSize) else value


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{value!r} ({type(value).__name__})"
