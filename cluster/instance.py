"""Building one pool instance from the deployment config: its engine in the right role, its KV
sender or receiver, and the transport servers a decode instance listens on (a colocated replica
is a decode worker whose engine prefills its own prompts, with no KV to receive). Plain functions, so
the same instance runs inside a Ray actor (cluster/actors.py) or directly in a test."""

from __future__ import annotations

from collections.abc import Callable

from cluster.config import ClusterConfig
from decode_worker.worker import DecodeChunk, DecodeWorker
from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_loader import LoadedModel
from kv_transfer import transports
from kv_transfer.codecs import CodecSpec
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.transport import Connection, TransportServer
from prefill_worker.worker import PrefillWorker

# What a decode instance listens on for each configured transport ("auto" picks per request: shm
# when the prefill instance shares the node, gRPC otherwise).
SERVED_KINDS = {
    "auto": ("shm", "grpc"),
    "shm": ("shm",),
    "grpc": ("grpc",),
    "ray": ("ray",),
    "local": ("local",),
}


def batching(config: ClusterConfig, role: str) -> dict[str, int | None]:
    """The scheduler settings of an instance in `role` (prefill, decode or colocated): what the
    workers run and what the placement simulator steps, from one place."""
    p, d = config.prefill, config.decode
    if role == "prefill":
        return {
            "max_num_seqs": min(256, p.max_num_batched_tokens),
            "max_num_batched_tokens": p.max_num_batched_tokens,
            "max_prefill_chunk": p.chunk_size,
        }
    if role == "decode":
        return {"max_num_seqs": d.max_batch, "max_num_batched_tokens": max(d.max_batch, 256)}
    return {
        "max_num_seqs": d.max_batch,
        "max_num_batched_tokens": max(p.max_num_batched_tokens, d.max_batch),
        "max_prefill_chunk": p.chunk_size,
    }


def engine_config(config: ClusterConfig, role: str) -> EngineConfig:
    m = config.model
    memory = config.prefill.kv_cache_memory if role == "prefill" else config.decode.kv_cache_memory
    pool = getattr(config, role)  # its section, whether or not the deployment runs that pool
    return EngineConfig(
        model=m.name,
        tensor_parallel_size=pool.tp,
        pipeline_parallel_size=pool.pp,
        dtype=m.dtype,
        device=m.device,
        max_model_len=m.max_model_len,
        kv_cache_memory=memory,
        **batching(config, role),
    )


def _layout(engine: LLMEngine) -> KVLayout:
    return KVLayout.of_cache(engine.model_config, engine.runner.kv_cache)


def connector(config: ClusterConfig) -> Callable[[tuple[str, str]], Connection]:
    """How a prefill instance opens a link to a decode instance's (kind, address)."""
    token = config.server.auth_token

    def connect(endpoint: tuple[str, str]) -> Connection:
        kind, address = endpoint
        options = {"token": token} if kind == "grpc" else {}
        return transports.connect(kind, address, **options)

    return connect


def build_prefill(config: ClusterConfig, loaded: LoadedModel | None = None) -> PrefillWorker:
    engine = LLMEngine(engine_config(config, "prefill"), loaded=loaded, role="prefill")
    kv = config.kv_transfer
    codec = CodecSpec(kv.codec, "" if kv.lossless == "none" else kv.lossless)
    sender = KVSender(
        engine.runner.kv_cache,
        _layout(engine),
        engine.scheduler.allocator,
        codec,
        lease_seconds=kv.lease_seconds,
        max_frame_bytes=kv.max_frame_bytes,
    )
    return PrefillWorker(engine, sender, connector(config), layerwise=kv.layerwise)


def build_decode(
    config: ClusterConfig,
    emit: Callable[[list[DecodeChunk]], None],
    loaded: LoadedModel | None = None,
    host: str = "127.0.0.1",
) -> tuple[DecodeWorker, dict[str, TransportServer]]:
    """The worker (streaming each step's chunks to `emit`) and its KV servers by kind; the caller
    closes the servers when it stops."""
    engine = LLMEngine(engine_config(config, "decode"), loaded=loaded, role="decode")
    kv = config.kv_transfer
    receiver = KVReceiver(
        engine.runner.kv_cache,
        _layout(engine),
        engine.scheduler.allocator,
        timeout=kv.lease_seconds,
        max_frame_bytes=max(kv.max_frame_bytes, 1 << 20) * 2,
    )
    servers: dict[str, TransportServer] = {}
    for kind in SERVED_KINDS[kv.transport]:
        options = {"host": host, "token": config.server.auth_token} if kind == "grpc" else {}
        servers[kind] = transports.serve(kind, receiver, **options)
    return DecodeWorker(engine, receiver, emit), servers


def build_colocated(
    config: ClusterConfig, emit: Callable[[list[DecodeChunk]], None], loaded: LoadedModel | None = None
) -> DecodeWorker:
    """A colocated replica: the engine prefills and decodes, every token streamed to `emit`."""
    engine = LLMEngine(engine_config(config, "colocated"), loaded=loaded, role="colocated")
    return DecodeWorker(engine, None, emit)
