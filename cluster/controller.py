"""`Controller`: the cluster's brain between the front ends and the pools. It keeps each
instance's load and health from periodic reports, routes every request through the Router, and
runs its life across the two instances, retrying on another instance when one dies.

    generate(request)
      admit ──► Router picks (prefill P, decode D); waits while no decode has room (bounded queue)
      D.reserve(n prompt tokens) ──► P.prefill(request, D's KV endpoint) ──► first token  (TTFT)
      D.start(...) ──► the request's chunks every step ──► Delta events ──► Final      (TPOT)
        (each decode instance has one stream of every request's chunks, one item per step; a
        pump per instance hands each chunk to its request's inbox)
    colocated replicas instead: the Router picks one, D.submit(request) ──► chunks as above, the
      first token included (the replica prefills in chunks between its decode steps)
      an instance dies or a transfer fails: abort the attempt on both, replay prompt + the tokens
      already streamed on another pair (the client sees one continuous stream), at most
      `max_retries` times, then UNAVAILABLE
      the client goes away: abort the request on both instances (their blocks are freed)

Each attempt has its own id (`<request>.<attempt>`), so a late frame or abort of a failed attempt
can never touch the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from ray.exceptions import RayActorError

from cluster.actors import InstanceInfo, InstanceLoad
from cluster.config import ClusterConfig
from cluster.metrics import Metrics
from cluster.protocol import Delta, Final, ModelCard, Overloaded, Timings, Unavailable
from cluster.router import Router
from cluster.validation import RequestValidator
from engine.sampling_params import SamplingParams
from kv_transfer.errors import TransferError
from kv_transfer.resharding import KVDestination
from prefill_worker.worker import PrefillRequest, PrefillResult

log = logging.getLogger(__name__)
RETRIABLE = (RayActorError, TransferError, asyncio.TimeoutError, ConnectionError)


@dataclass
class Instance:
    name: str
    role: str
    handle: Any  # a Ray actor handle
    info: InstanceInfo | None = None
    healthy: bool = False
    inboxes: dict[str, asyncio.Queue] = field(default_factory=dict)  # decode: attempt -> its chunks
    pump: asyncio.Task | None = None  # decode: reads the instance's chunk stream

    @property
    def streams(self) -> bool:
        """Decode instances and colocated replicas stream chunks."""
        return self.role in ("decode", "colocated")


class Controller:
    def __init__(
        self,
        config: ClusterConfig,
        model: ModelCard,
        validator: RequestValidator,
        metrics: Metrics,
        instances: Sequence[Instance],
        max_retries: int = 3,
        report_interval: float = 0.05,
        unavailable_after: float = 60.0,
    ) -> None:
        self.config = config
        self._model = model
        self.validator = validator
        self.metrics = metrics
        self.instances = {i.name: i for i in instances}
        self.router = Router(max_waiting=config.server.max_queue)
        self.max_retries = max_retries
        self.report_interval = report_interval
        self.unavailable_after = unavailable_after
        self._changed = asyncio.Event()
        self._reporter: asyncio.Task | None = None
        self._num_queued = 0  # waiting for room before admission
        self._num_running = 0
        self._draining = False

    # --- Backend ------------------------------------------------------------------------------

    @property
    def model(self) -> ModelCard:
        return self._model

    @property
    def tokenizer(self):
        """The model's tokenizer (front ends spell logprob tokens with it), or None."""
        return self.validator.tokenizer

    def prepare(self, model, params, prompt=None, token_ids=None, messages=None) -> list[int]:
        return self.validator.prepare(model, params, prompt=prompt, token_ids=token_ids, messages=messages)

    def is_healthy(self) -> bool:
        roles = {i.role for i in self.instances.values() if i.healthy}
        return not self._draining and (roles == {"prefill", "decode"} or roles == {"colocated"})

    @property
    def num_requests(self) -> int:
        return self._num_queued + self.router.waiting + self._num_running

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, timeout: float = 600.0) -> None:
        """Wait until every instance answers, then keep their reports coming."""
        await asyncio.wait_for(asyncio.gather(*(self._refresh(i) for i in self.instances.values())), timeout)
        self._reporter = asyncio.create_task(self._report_loop(), name="load-reports")

    async def drain(self, timeout: float) -> None:
        """Refuse new requests and wait (bounded) for those in flight."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self.num_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
        for instance in self.instances.values():
            if instance.pump is not None:
                instance.pump.cancel()

    async def _refresh(self, instance: Instance) -> None:
        """Ask an instance for its info (new endpoints after a restart) and load."""
        instance.info = await instance.handle.info.remote()
        self._report(instance, await instance.handle.load.remote())

    def _subscribe(self, instance: Instance) -> None:
        """Keep a pump on every live decode instance (a restarted actor gets a new one)."""
        if instance.streams and instance.healthy and (instance.pump is None or instance.pump.done()):
            instance.pump = asyncio.create_task(self._pump(instance), name=f"chunks-{instance.name}")

    async def _pump(self, instance: Instance) -> None:
        """Hand every chunk of the instance's stream to its attempt's inbox. When the stream
        breaks, every attempt on the instance gets the error (and retries elsewhere)."""
        error: BaseException
        try:
            async for ref in instance.handle.chunks.remote():
                for chunk in await ref:
                    inbox = instance.inboxes.get(chunk.request_id)
                    if inbox is not None:
                        inbox.put_nowait(chunk)
            error = TransferError(f"decode instance {instance.name} closed its chunk stream")
        except RayActorError as exc:
            self._mark_dead(instance)
            error = exc
        except asyncio.CancelledError:
            error = Unavailable("the server is shutting down")
            raise
        finally:
            for inbox in instance.inboxes.values():
                inbox.put_nowait(error)

    def _report(self, instance: Instance, report: InstanceLoad) -> None:
        instance.healthy = report.load.healthy
        self._subscribe(instance)
        if not instance.healthy:
            self.router.remove(instance.name)
        elif instance.role == "prefill":
            self.router.report_prefill(instance.name, report.load)
        elif instance.role == "colocated":
            self.router.report_colocated(instance.name, report.load)
        else:
            self.router.report_decode(instance.name, report.load)
        self.metrics.report_blocks(instance.name, instance.role, report.blocks_used, report.blocks_total)

    async def _poll(self, instance: Instance) -> None:
        try:
            if instance.healthy:
                report = await asyncio.wait_for(instance.handle.load.remote(), 5.0)
                self._report(instance, report)
            else:  # dead or restarting: it may have come back with new endpoints
                await asyncio.wait_for(self._refresh(instance), 5.0)
                log.info("instance %s is serving", instance.name)
        except (RayActorError, asyncio.TimeoutError):
            self._mark_dead(instance)

    def _mark_dead(self, instance: Instance) -> None:
        if instance.healthy:
            log.warning("instance %s stopped answering; routing around it", instance.name)
        instance.healthy = False
        self.router.remove(instance.name)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(i) for i in self.instances.values()))
            self.metrics.waiting.set(self._num_queued + self.router.waiting)
            self.metrics.running.set(self._num_running)
            self._changed.set()
            self._changed = asyncio.Event()
            await asyncio.sleep(self.report_interval)

    # --- one request --------------------------------------------------------------------------

    async def _admit(
        self, num_tokens: int, max_new_tokens: int, deadline: float
    ) -> tuple[Instance, Instance]:
        if self._draining:
            raise Unavailable("the server is shutting down")
        waiting = self._num_queued + self.router.waiting
        if waiting >= self.config.server.max_queue:
            raise Overloaded(
                f"{waiting} requests are waiting (the bound is {self.config.server.max_queue}); retry later"
            )
        self._num_queued += 1
        unavailable_since = None
        try:
            while True:
                try:
                    route = self.router.admit(num_tokens, max_new_tokens)
                    return self.instances[route.prefill], self.instances[route.decode]
                except Overloaded as exc:
                    now = time.monotonic()
                    if not self.is_healthy():
                        unavailable_since = unavailable_since or now
                        if now - unavailable_since > self.unavailable_after:
                            raise Unavailable(f"no healthy instance: {exc}") from None
                    if now >= deadline:
                        raise Overloaded(f"timed out waiting for capacity: {exc}") from None
                    await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - now))
        finally:
            self._num_queued -= 1

    def _destination(self, prefill: Instance, decode: Instance) -> KVDestination:
        """Where `prefill` sends the KV: each of `decode`'s ranks over shm when every rank of both
        instances shares one node and the decode side serves it, else over gRPC."""
        endpoints = dict(decode.info.endpoints)
        if len(endpoints) == 1:
            kind = next(iter(endpoints))
        else:
            nodes = set(prefill.info.nodes or (prefill.info.node_id,)) | set(
                decode.info.nodes or (decode.info.node_id,)
            )
            kind = "shm" if len(nodes) == 1 and "shm" in endpoints else "grpc"
        return KVDestination(kind, endpoints[kind], self.config.decode.tp, self.config.decode.pp)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta | Final]:
        arrival = time.monotonic()
        deadline = arrival + self.config.server.request_timeout_s
        streamed: list[int] = []
        marks: dict[str, float] = {}
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.metrics.retries.inc()
            try:
                async for event in self._attempt(
                    f"{request_id}.{attempt}", prompt_ids, streamed, params, deadline, marks
                ):
                    if isinstance(event, Final):
                        event = self._final(request_id, len(prompt_ids), len(streamed), event, arrival, marks)
                        self.metrics.observe(event)
                    yield event
                return
            except RETRIABLE as exc:
                log.warning("request %s attempt %d failed (%r); retrying elsewhere", request_id, attempt, exc)
                last = exc
        raise Unavailable(
            f"request {request_id} failed on {self.max_retries + 1} attempts; last error: {last}"
        )

    async def _attempt(
        self,
        attempt_id: str,
        prompt_ids: list[int],
        streamed: list[int],
        params: SamplingParams,
        deadline: float,
        marks: dict[str, float],
    ) -> AsyncIterator[Delta | Final]:
        """One try on one (prefill, decode) pair; `streamed` grows with every token sent, so a retry
        replays the prompt plus those tokens and asks only for what is left."""
        ids = prompt_ids + streamed
        if streamed:
            n = len(streamed)
            params = replace(
                params, max_tokens=params.max_tokens - n, min_tokens=max(0, params.min_tokens - n)
            )
        prefill, decode = await self._admit(len(ids), params.max_tokens, deadline)
        queued, done = True, False
        try:
            if decode.role == "colocated":  # one replica does both; the route names it twice
                marks.setdefault("prefill_sent", time.monotonic())
                self.router.leave_queue()  # at the replica now, in its engine's queue
                queued = False
                start = partial(decode.handle.submit.remote, attempt_id, ids, params)
            else:
                result = await self._prefill(prefill, decode, attempt_id, ids, params, marks)
                streamed.append(result.first_token)
                yield Delta((result.first_token,), result.text, (result.logprob,) if result.logprob else None)
                if result.finish_reason != "prefilled":
                    decode.handle.abort.remote(attempt_id)
                    done = True
                    yield Final(attempt_id, result.finish_reason, 0, 0, Timings(), result.error)
                    return
                self.router.leave_queue()
                queued = False
                start = partial(
                    decode.handle.start.remote, attempt_id, ids, result.first_token, result.text, params
                )
            async for event in self._stream(decode, attempt_id, start, streamed, marks):
                done = isinstance(event, Final)
                yield event
        finally:
            if queued:
                self.router.leave_queue()
            if not done:  # failed, or the client went away: free whatever either side holds
                prefill.handle.abort.remote(attempt_id)
                if decode is not prefill:
                    decode.handle.abort.remote(attempt_id)

    async def _prefill(
        self,
        prefill: Instance,
        decode: Instance,
        attempt_id: str,
        ids: list[int],
        params: SamplingParams,
        marks: dict[str, float],
    ) -> PrefillResult:
        """Reserve the decode side's blocks, prefill (the KV streams there), return the first token."""
        try:
            await decode.handle.reserve.remote(attempt_id, len(ids))
            marks.setdefault("prefill_sent", time.monotonic())
            request = PrefillRequest(attempt_id, tuple(ids), params, self._destination(prefill, decode))
            result = await prefill.handle.prefill.remote(request)
        except RayActorError:
            self._mark_dead(prefill if not await _alive(prefill) else decode)
            raise
        marks.setdefault("queue_s", result.queue_s)
        marks["prefill_s"] = marks.get("prefill_s", 0.0) + result.prefill_s
        marks.setdefault("first_token", time.monotonic())
        marks["transfer_s"] = marks.get("transfer_s", 0.0) + result.transfer_s
        return result

    async def _stream(
        self,
        instance: Instance,
        attempt_id: str,
        start: Callable[[], Awaitable[None]],
        streamed: list[int],
        marks: dict[str, float],
    ) -> AsyncIterator[Delta | Final]:
        """The attempt's chunks from a streaming instance: its inbox is registered, then `start()`
        (the call that puts the request in its batch); a Delta per chunk with news, then the Final."""
        self._num_running += 1
        instance.inboxes[attempt_id] = inbox = asyncio.Queue()
        try:
            await start()
            while True:
                chunk = await inbox.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                if chunk.token_ids:
                    marks.setdefault("first_token", time.monotonic())  # colocated: its first token
                if chunk.token_ids or chunk.text:
                    streamed.extend(chunk.token_ids)
                    yield Delta(chunk.token_ids, chunk.text, chunk.logprobs)
                if chunk.finish_reason is not None:
                    marks["last_token"] = time.monotonic()
                    yield Final(attempt_id, chunk.finish_reason, 0, 0, Timings(), chunk.error)
                    return
        except RayActorError:
            self._mark_dead(instance)
            raise
        finally:
            self._num_running -= 1
            del instance.inboxes[attempt_id]

    def _final(
        self,
        request_id: str,
        num_prompt: int,
        num_streamed: int,
        final: Final,
        arrival: float,
        marks: dict[str, float],
    ) -> Final:
        now = time.monotonic()
        first = marks.get("first_token", now)
        last = marks.get("last_token", first)
        tpot = (last - first) / (num_streamed - 1) if num_streamed > 1 else 0.0
        queued = marks.get("prefill_sent", arrival) - arrival + marks.get("queue_s", 0.0)
        timings = Timings(
            queued=queued,
            ttft=first - arrival,
            transfer=marks.get("transfer_s", 0.0),
            prefill=marks.get("prefill_s", 0.0),
            tpot=tpot,
            e2e=now - arrival,
        )
        return replace(
            final,
            request_id=request_id,
            prompt_tokens=num_prompt,
            completion_tokens=num_streamed,
            timings=timings,
        )


async def _alive(instance: Instance) -> bool:
    try:
        await asyncio.wait_for(instance.handle.load.remote(), 2.0)
        return True
    except (RayActorError, asyncio.TimeoutError):
        return False
