"""Building one pool instance from the deployment config: its engine in the right role, its KV
sender or receiver (across every rank of a tensor- or pipeline-parallel instance), and the
transport servers a decode instance listens on (a colocated replica is a decode worker whose
engine prefills its own prompts, with no KV to receive). Plain functions, so
the same instance runs inside a Ray actor (cluster/actors.py) or directly in a test."""

from __future__ import annotations

from collections.abc import Callable

from cluster.config import ClusterConfig
from decode_worker.worker import DecodeChunk, DecodeWorker
from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_loader import LoadedModel
from engine.parallel.rank_service import RankServices
from engine.parallel.ranks import RankLauncher
from kv_transfer import transports
from kv_transfer.codecs import CodecSpec
from kv_transfer.instance_receiver import InstanceReceiver
from kv_transfer.instance_sender import InstanceSender
from kv_transfer.rank_kv import RankKVService, num_sources, rank_layout
from kv_transfer.receiver import KVReceiver
from kv_transfer.resharding import ShardLayout
from kv_transfer.sender import KVSender
from kv_transfer.transport import TransportServer
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
        # a prefill cache decode workers on the node read in place (the one-copy path over shm)
        shared_kv_cache=role == "prefill"
        and m.device == "cpu"
        and config.kv_transfer.transport in ("auto", "shm"),
        **batching(config, role),
    )


def _codec(config: ClusterConfig) -> CodecSpec:
    kv = config.kv_transfer
    return CodecSpec(kv.codec, "" if kv.lossless == "none" else kv.lossless)


def _receive_limit(config: ClusterConfig) -> int:
    """The largest frame a decode rank accepts: twice what a sender makes, headers and all."""
    return max(config.kv_transfer.max_frame_bytes, 1 << 20) * 2


def rank_service(config: ClusterConfig, role: str, host: str = "127.0.0.1") -> RankKVService | None:
    """What the ranks beyond 0 of a parallel prefill or decode instance run for KV transfer."""
    pool = getattr(config, role)
    if pool.tp * pool.pp == 1:
        return None
    kv = config.kv_transfer
    return RankKVService(
        role,
        _codec(config),
        kv.lease_seconds,
        kv.max_frame_bytes if role == "prefill" else _receive_limit(config),
        token=config.server.auth_token,
        kinds=SERVED_KINDS[kv.transport],
        host=host,
        source=(config.prefill.tp, config.prefill.pp),
    )


def _services(engine: LLMEngine) -> RankServices | None:
    return engine.ranks.services if engine.ranks is not None else None


def build_prefill(
    config: ClusterConfig, loaded: LoadedModel | None = None, launcher: RankLauncher | None = None
) -> PrefillWorker:
    """`launcher`: who starts the engine's other ranks (by default, processes spawned here)."""
    engine = LLMEngine(
        engine_config(config, "prefill"),
        loaded=loaded,
        role="prefill",
        rank_service=rank_service(config, "prefill"),
        rank_launcher=launcher,
    )
    kv = config.kv_transfer
    shard = ShardLayout.of(engine.model_config, config.prefill.tp, config.prefill.pp)
    sender = KVSender(
        engine.runner.kv_cache,
        rank_layout(engine.model_config, engine.runner.kv_cache, shard, 0),
        None,  # the instance sender frees the blocks, once every rank has sent its part
        _codec(config),
        lease_seconds=kv.lease_seconds,
        max_frame_bytes=kv.max_frame_bytes,
    )
    connect = transports.connector(config.server.auth_token)
    instance = InstanceSender(sender, shard, engine.scheduler.allocator, connect, _services(engine))
    return PrefillWorker(engine, instance, layerwise=kv.layerwise)


def build_decode(
    config: ClusterConfig,
    emit: Callable[[list[DecodeChunk]], None],
    loaded: LoadedModel | None = None,
    host: str = "127.0.0.1",
    launcher: RankLauncher | None = None,
) -> tuple[DecodeWorker, dict[str, TransportServer]]:
    """The worker (streaming each step's chunks to `emit`) and rank 0's KV servers by kind; the
    caller closes the servers when it stops (the other ranks close their own)."""
    engine = LLMEngine(
        engine_config(config, "decode"),
        loaded=loaded,
        role="decode",
        rank_service=rank_service(config, "decode", host),
        rank_launcher=launcher,
    )
    kv = config.kv_transfer
    model = engine.model_config
    shard = ShardLayout.of(model, config.decode.tp, config.decode.pp)
    receiver = KVReceiver(
        engine.runner.kv_cache,
        rank_layout(model, engine.runner.kv_cache, shard, 0),
        engine.scheduler.allocator,
        timeout=kv.lease_seconds,
        max_frame_bytes=_receive_limit(config),
    )
    servers = transports.serve_kinds(SERVED_KINDS[kv.transport], receiver, host, config.server.auth_token)
    sources = num_sources(ShardLayout.of(model, config.prefill.tp, config.prefill.pp), shard, 0)
    instance = InstanceReceiver(receiver, sources, _services(engine))
    return DecodeWorker(engine, instance, emit), servers


def kv_endpoints(
    worker: DecodeWorker, servers: dict[str, TransportServer]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(transport kind, the address of each rank's server) of a decode instance: what a prefill
    instance's KVDestination names."""
    services = worker.receiver.services
    others = services.ranks if services is not None else ()
    return tuple(
        (kind, (server.address, *(services.info[rank][kind] for rank in others)))
        for kind, server in servers.items()
    )


def build_colocated(
    config: ClusterConfig,
    emit: Callable[[list[DecodeChunk]], None],
    loaded: LoadedModel | None = None,
    launcher: RankLauncher | None = None,
) -> DecodeWorker:
    """A colocated replica: the engine prefills and decodes, every token streamed to `emit`."""
    engine = LLMEngine(
        engine_config(config, "colocated"), loaded=loaded, role="colocated", rank_launcher=launcher
    )
    return DecodeWorker(engine, None, emit)
