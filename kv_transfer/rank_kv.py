"""The KV transfer of one rank of a tensor- or pipeline-parallel instance: every rank sends (prefill)
or receives (decode) exactly the rectangle of layers x KV heads its own cache holds, so no rank
ever gathers a request's whole KV (kv_transfer/resharding.py has the plan).

    prefill instance tp=2                                   decode instance pp=2
    rank 0  KVSender ── routes: pieces (0,0), (0,1) ──────► rank 0  KVReceiver + its servers
    rank 1  KVSender ── routes: pieces (1,0), (1,1) ──────► rank 1  KVReceiver + its servers
       ▲ "send" (rank_service)                                 ▲ "reserve" / "take" / "drop"
    rank 0: InstanceSender (holds the blocks)               rank 0: InstanceReceiver (owns the blocks)

Rank 0 runs its part in the worker's own process (kv_transfer/instance_sender.py,
instance_receiver.py); ranks beyond 0 run a `PrefillRankKV` or `DecodeRankKV`, built in the rank
by `RankKVService` (engine/parallel/rank_service.py calls it) and called by rank 0. Block ids
mean the same on every rank of an instance, so rank 0's allocator decides for all of them, and
only rank 0 frees.

Ranks of one instance share a node; the transports between ranks of two instances are `shm` or
`grpc` (each rank serves its own), never `local` or `ray` (the ranks are not Ray workers).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.parallel.ranks import RankPlace
from kv_transfer import transports
from kv_transfer.codecs import CodecSpec
from kv_transfer.connections import ConnectionPool
from kv_transfer.errors import TransferError
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.resharding import KVDestination, ShardLayout, pieces_for, pieces_from, reshard_plan
from kv_transfer.sender import KVSender, Route, SendState


def rank_layout(model: ModelConfig, cache: torch.Tensor, shard: ShardLayout, rank: int) -> KVLayout:
    """The KV layout of rank `rank`'s cache in an instance laid out as `shard`."""
    return KVLayout.of_cache(model, cache, shard.layers(rank), shard.heads(rank))


def routes_for(
    shard: ShardLayout, rank: int, destination: KVDestination, pool: ConnectionPool
) -> list[Route]:
    """The routes prefill rank `rank` (of an instance laid out as `shard`) sends along to
    `destination`, over links from `pool`; a decode rank it cannot reach raises TransferError and
    drops the destination's links (the instance may have restarted)."""
    plan = reshard_plan(shard, destination.layout(shard.num_layers, shard.num_kv_heads))
    try:
        return [
            Route(pool.get(destination.endpoint(p.dst)), p.layers, p.heads) for p in pieces_from(plan, rank)
        ]
    except Exception as exc:  # noqa: BLE001 - fails this request only
        for dst in range(len(destination.addresses)):
            pool.drop(destination.endpoint(dst))
        if isinstance(exc, TransferError):
            raise
        raise TransferError(f"cannot reach the decode instance at {destination.addresses}: {exc}") from exc


def num_sources(source: ShardLayout, shard: ShardLayout, rank: int) -> int:
    """How many prefill ranks of a `source`-laid-out instance send to decode rank `rank`."""
    return len(pieces_for(reshard_plan(source, shard), rank))


@dataclass(frozen=True)
class RankKVService:
    """What a parallel instance's ranks beyond 0 run for KV transfer: picklable, built in the rank."""

    role: str  # prefill | decode
    codec: CodecSpec
    lease_seconds: float
    max_frame_bytes: int
    token: str | None = None
    kinds: tuple[str, ...] = ()  # decode: the transports each rank serves
    host: str = "127.0.0.1"  # decode: where gRPC listens
    source: tuple[int, int] = (1, 1)  # decode: the prefill instances' (tp, pp)

    def __call__(
        self, place: RankPlace, runner: ModelRunner, model: ModelConfig
    ) -> PrefillRankKV | DecodeRankKV:
        shard = ShardLayout.of(model, place.tp, place.pp)
        layout = rank_layout(model, runner.kv_cache, shard, place.rank)
        if self.role == "prefill":
            sender = KVSender(
                runner.kv_cache, layout, None, self.codec, self.lease_seconds, self.max_frame_bytes
            )
            handler = PrefillRankKV(
                sender, shard, place.rank, ConnectionPool(transports.connector(self.token))
            )
            handler.install(runner)
            return handler
        receiver = KVReceiver(runner.kv_cache, layout, None, self.lease_seconds, self.max_frame_bytes)
        sources = num_sources(ShardLayout.of(model, *self.source), shard, place.rank)
        servers = transports.serve_kinds(self.kinds, receiver, self.host, self.token)
        return DecodeRankKV(receiver, sources, servers)


class PrefillRankKV:
    """Prefill rank r >= 1: sends its pieces of each request. On a tensor-parallel instance it sends
    layer by layer as its own forward stores them (the step names the requests, `prepare` gave
    their destinations); otherwise all at once when rank 0 says, after the step."""

    MAX_PREPARED = 4096

    def __init__(self, sender: KVSender, shard: ShardLayout, rank: int, pool: ConnectionPool) -> None:
        self.sender = sender
        self.shard = shard
        self.rank = rank
        self.pool = pool
        self._prepared: OrderedDict[str, KVDestination] = OrderedDict()
        self._failed: dict[str, BaseException] = {}  # a layer-wise send that failed, until `send`
        self._lock = threading.Lock()
        self.sent = {"layer by layer": 0, "whole": 0}  # requests, by how their KV left this rank

    def install(self, runner: ModelRunner) -> None:
        """Send layer by layer from this rank's forward (one stage: every layer runs here)."""
        if self.shard.pp == 1:
            runner.layer_hook = self.on_layer_stored

    def prepare(self, request_id: str, destination: KVDestination) -> None:
        with self._lock:
            self._prepared[request_id] = destination
            while len(self._prepared) > self.MAX_PREPARED:
                self._prepared.popitem(last=False)

    def on_layer_stored(self, finishing: list[tuple[str, list[int]]], layer: int) -> None:
        """The rank's forward stored `layer` of the step's finishing requests: send it."""
        for request_id, blocks in finishing:
            try:
                if layer == 0:
                    with self._lock:
                        destination = self._prepared.pop(request_id, None)
                    if destination is None:
                        continue  # not prepared: sent whole when rank 0 says
                    routes = routes_for(self.shard, self.rank, destination, self.pool)
                    self.sender.start(request_id, blocks, routes)
                elif self.sender.state(request_id) is not SendState.SENDING:
                    continue
                self.sender.send_layers(request_id, layer + 1)
            except Exception as exc:  # noqa: BLE001 - reported when rank 0 asks (`send`)
                self._failed[request_id] = exc

    def send(self, request_id: str, block_ids: list[int], destination: KVDestination) -> None:
        """Send what is left of this rank's pieces (everything, unless its forward sent them layer
        by layer) and wait for every receiver's ack (or raise its error)."""
        error = self._failed.pop(request_id, None)
        if error is not None:
            raise error
        layerwise = self.sender.state(request_id) is SendState.SENDING
        if not layerwise:
            routes = routes_for(self.shard, self.rank, destination, self.pool)
            self.sender.start(request_id, block_ids, routes)
        self.sender.finish(request_id)
        self.sent["layer by layer" if layerwise else "whole"] += 1

    def counts(self) -> dict[str, int]:
        """Requests sent so far, by how their KV left this rank."""
        return dict(self.sent)

    def abort(self, request_id: str, reason: str) -> None:
        with self._lock:
            self._prepared.pop(request_id, None)
        self._failed.pop(request_id, None)
        self.sender.abort(request_id, reason)

    def housekeeping(self) -> None:
        self.sender.expire()

    def close(self) -> None:
        self.pool.close()


class DecodeRankKV:
    """Decode rank r >= 1: receives its rectangle of a request's KV into the blocks rank 0 reserved."""

    def __init__(self, receiver: KVReceiver, sources: int, servers: dict) -> None:
        self.receiver = receiver
        self.sources = sources
        self.servers = servers

    def info(self) -> dict[str, str]:
        """The address this rank listens on, per transport kind."""
        return {kind: server.address for kind, server in self.servers.items()}

    def reserve(self, request_id: str, num_tokens: int, block_ids: list[int], timeout: float) -> None:
        self.receiver.adopt(request_id, num_tokens, block_ids, timeout, self.sources)

    def take(self, request_id: str) -> None:
        """Succeeds only when this rank's part of the request arrived whole; forgets it either way."""
        try:
            self.receiver.take(request_id)
        except TransferError:
            self.receiver.abort(request_id, "not complete when rank 0 took the request")
            raise

    def drop(self, request_id: str, reason: str) -> None:
        self.receiver.abort(request_id, reason)

    def housekeeping(self) -> None:
        self.receiver.expire()

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
