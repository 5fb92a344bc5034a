"""The pools' Ray actors: thin async shells around PrefillWorker and DecodeWorker. Each builds its
instance from the deployment config when Ray starts (or restarts) it, and turns the worker's
Futures and callbacks into awaitables and a streaming generator. A colocated replica is a
DecodeActor built in the colocated role: `submit` instead of reserve/start, the same chunk stream.

    controller ── PrefillActor.prefill(PrefillRequest) ──► PrefillResult (after decode acked the KV)
               ── DecodeActor.reserve(request, n)      ──► blocks held for the KV
               ── DecodeActor.start(request, ...)      ──► the request joins the running batch
               ── DecodeActor.submit(request, ...)     ──► colocated: prefilled and decoded there
               ── DecodeActor.chunks()  (one stream)   ──► every request's [DecodeChunk, ...] per step
               ── *.abort(request), *.load(), *.info()
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
from dataclasses import dataclass

import ray
import torch

from cluster.config import ClusterConfig
from cluster.instance import build_colocated, build_decode, build_prefill, kv_endpoints
from cluster.rank_actors import RayRankLauncher, instance_bundles
from cluster.router import DecodeLoad, PrefillLoad
from decode_worker.worker import DecodeChunk, DecodeWorker
from engine.sampling_params import SamplingParams
from prefill_worker.worker import PrefillRequest, PrefillResult, PrefillWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceInfo:
    """Where an instance runs; it changes when Ray restarts the actor."""

    node_id: str  # rank 0's
    # decode: (transport kind, the address each of its ranks listens on)
    endpoints: tuple[tuple[str, tuple[str, ...]], ...] = ()
    nodes: tuple[str, ...] = ()  # every rank's node (rank 0's first)


@dataclass(frozen=True)
class InstanceLoad:
    load: PrefillLoad | DecodeLoad
    blocks_used: int
    blocks_total: int


# A worker steps its engine on one thread beside the KV transport's and Ray's threads. With
# CPython's default 5 ms switch interval, a thread that needs the GIL while the engine thread
# computes (a KV frame to decode, a step's chunks to emit) waits up to 5 ms per hand-off, and the
# engine thread as long again for its own turn after each torch call. On the local cluster at
# 0.9 req/s (chatbot x0.5), 0.5 ms brought decode TPOT p50 from 59 to 37 ms.
GIL_SWITCH_INTERVAL_S = 0.0005


def _setup_process(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def _end_instance(exc: BaseException) -> None:
    """The engine cannot step (one of its tensor/pipeline ranks died, or its device failed): end
    the actor's process. Ray restarts the instance as a whole (the engine's other ranks see their
    pipe close and exit), and the controller retries its requests elsewhere meanwhile."""
    log.critical("instance failed (%s: %s); exiting so Ray restarts it", type(exc).__name__, exc)
    logging.shutdown()
    os._exit(1)


def _guard(worker: PrefillWorker | DecodeWorker) -> None:
    worker.loop.on_failure = _end_instance


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _launcher(config: ClusterConfig, role: str) -> RayRankLauncher | None:
    """The engine's other tensor/pipeline ranks as Ray actors in this instance's placement group."""
    bundles, _ = instance_bundles(config, role)
    if len(bundles) == 1:
        return None
    group = ray.util.get_current_placement_group()
    return RayRankLauncher(group, bundles[1]["CPU"], int(bundles[1].get("GPU", 0)))


def _info(worker: PrefillWorker | DecodeWorker, endpoints=()) -> InstanceInfo:
    ranks = worker.engine.ranks
    others = tuple(p.node_id for p in ranks.processes) if ranks is not None else ()
    return InstanceInfo(_node_id(), endpoints, (_node_id(), *others))


def _load(worker: PrefillWorker | DecodeWorker) -> InstanceLoad:
    allocator = worker.allocator
    used = allocator.num_blocks - allocator.num_free_blocks
    return InstanceLoad(worker.load(), used, allocator.num_blocks)


class PrefillInstance:
    def __init__(self, config: ClusterConfig, name: str) -> None:
        _setup_process(config.prefill.cpus)
        self.name = name
        self.worker = build_prefill(config, launcher=_launcher(config, "prefill"))
        _guard(self.worker)
        self.worker.start()

    async def info(self) -> InstanceInfo:
        return _info(self.worker)

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        return await asyncio.wrap_future(self.worker.submit(request))

    async def abort(self, request_id: str) -> None:
        self.worker.abort(request_id)

    async def load(self) -> InstanceLoad:
        return _load(self.worker)


class DecodeInstance:
    def __init__(self, config: ClusterConfig, name: str, role: str = "decode") -> None:
        _setup_process(config.pools[role].cpus)
        self.name = name
        self._outbox: collections.deque[list[DecodeChunk]] = collections.deque()
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriber = 0
        if role == "colocated":
            self.worker, self.servers = (
                build_colocated(config, self._emit, launcher=_launcher(config, role)),
                {},
            )
        else:
            self.worker, self.servers = build_decode(
                config, self._emit, host=ray.util.get_node_ip_address(), launcher=_launcher(config, role)
            )
        _guard(self.worker)
        self.worker.start_loop()

    def _bind(self) -> asyncio.Event:
        """The actor's event loop is known only inside its async methods."""
        if self._ready is None:
            self._loop, self._ready = asyncio.get_running_loop(), asyncio.Event()
        return self._ready

    def _emit(self, chunks: list[DecodeChunk]) -> None:  # on the engine's loop thread
        self._outbox.append(chunks)
        self._loop.call_soon_threadsafe(self._ready.set)

    async def info(self) -> InstanceInfo:
        return _info(self.worker, kv_endpoints(self.worker, self.servers) if self.servers else ())

    async def reserve(self, request_id: str, num_prompt_tokens: int) -> None:
        await asyncio.wrap_future(self.worker.reserve(request_id, num_prompt_tokens))

    async def start(
        self,
        request_id: str,
        prompt_ids: list[int],
        first_token: int,
        first_text: str,
        params: SamplingParams,
    ) -> None:
        """Adopt a prefilled request; its chunks come through `chunks()`."""
        self._bind()
        await asyncio.wrap_future(self.worker.start(request_id, prompt_ids, first_token, first_text, params))

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Colocated: prefill and decode a fresh request here; its chunks come through `chunks()`."""
        self._bind()
        await asyncio.wrap_future(self.worker.submit(request_id, prompt_ids, params))

    async def chunks(self):
        """Every request's chunks, in step order, for the one subscriber (the controller): an item
        holds all chunks emitted since the last, so one step of a batch of N costs one item, not
        N. A new subscriber (the controller reconnecting) takes over from the previous one."""
        ready = self._bind()
        self._subscriber += 1
        me = self._subscriber
        while me == self._subscriber:
            await ready.wait()
            ready.clear()
            if me != self._subscriber:
                ready.set()  # the newer subscriber's turn
                return
            batch = []
            while self._outbox:
                batch.extend(self._outbox.popleft())
            if batch:
                yield batch

    async def abort(self, request_id: str) -> None:
        await asyncio.wrap_future(self.worker.abort(request_id))

    async def step_times(self, clear: bool = False) -> list[float]:
        """Seconds of the engine's recent steps, measured inside the worker (for benchmarks)."""
        times = list(self.worker.loop.step_times)
        if clear:
            self.worker.loop.step_times.clear()
        return times

    async def load(self) -> InstanceLoad:
        return _load(self.worker)


PrefillActor = ray.remote(PrefillInstance)
DecodeActor = ray.remote(DecodeInstance)
