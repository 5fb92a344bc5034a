"""The pools' Ray actors: thin async shells around PrefillWorker and DecodeWorker. Each builds its
instance from the deployment config when Ray starts (or restarts) it, and turns the worker's
Futures and callbacks into awaitables and a streaming generator.

    controller ── PrefillActor.prefill(PrefillRequest) ──► PrefillResult (after decode acked the KV)
               ── DecodeActor.reserve(request, n)      ──► blocks held for the KV
               ── DecodeActor.generate(...)            ──► stream of [DecodeChunk, ...] per step
               ── *.abort(request), *.load(), *.info()
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import ray
import torch

from cluster.config import ClusterConfig
from cluster.instance import build_decode, build_prefill
from cluster.router import DecodeLoad, PrefillLoad
from decode_worker.worker import DecodeWorker
from engine.sampling_params import SamplingParams
from prefill_worker.worker import PrefillRequest, PrefillResult, PrefillWorker


@dataclass(frozen=True)
class InstanceInfo:
    """Where an instance runs; it changes when Ray restarts the actor."""

    node_id: str
    endpoints: tuple[tuple[str, str], ...] = ()  # decode: (transport kind, address) it listens on


@dataclass(frozen=True)
class InstanceLoad:
    load: PrefillLoad | DecodeLoad
    blocks_used: int
    blocks_total: int


def _limit_threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _load(worker: PrefillWorker | DecodeWorker) -> InstanceLoad:
    allocator = worker.allocator
    used = allocator.num_blocks - allocator.num_free_blocks
    return InstanceLoad(worker.load(), used, allocator.num_blocks)


class PrefillInstance:
    def __init__(self, config: ClusterConfig, name: str) -> None:
        _limit_threads(config.prefill.cpus)
        self.name = name
        self.worker = build_prefill(config)
        self.worker.start()

    async def info(self) -> InstanceInfo:
        return InstanceInfo(_node_id())

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        return await asyncio.wrap_future(self.worker.submit(request))

    async def abort(self, request_id: str) -> None:
        self.worker.abort(request_id)

    async def load(self) -> InstanceLoad:
        return _load(self.worker)


class DecodeInstance:
    def __init__(self, config: ClusterConfig, name: str) -> None:
        _limit_threads(config.decode.cpus)
        self.name = name
        host = ray.util.get_node_ip_address()
        self.worker, self.servers = build_decode(config, host=host)
        self.worker.start_loop()

    async def info(self) -> InstanceInfo:
        return InstanceInfo(
            _node_id(), tuple((kind, server.address) for kind, server in self.servers.items())
        )

    async def reserve(self, request_id: str, num_prompt_tokens: int) -> None:
        await asyncio.wrap_future(self.worker.reserve(request_id, num_prompt_tokens))

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        first_token: int,
        first_text: str,
        params: SamplingParams,
    ):
        """Stream the request's chunks, several per item when the consumer is behind."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        finished = False
        await asyncio.wrap_future(
            self.worker.start(
                request_id,
                prompt_ids,
                first_token,
                first_text,
                params,
                lambda chunk: loop.call_soon_threadsafe(queue.put_nowait, chunk),
            )
        )
        try:
            while not finished:
                chunks = [await queue.get()]
                while not queue.empty():
                    chunks.append(queue.get_nowait())
                finished = chunks[-1].finish_reason is not None
                yield chunks
        finally:
            if not finished:  # the consumer went away: stop decoding it
                self.worker.abort(request_id)

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
