"""`pdserve bench`'s load generator: replays requests (Poisson arrivals from a workload preset, or a
trace) against a running cluster's gRPC endpoint and measures what each request sees.

Every request is sent at its scheduled arrival, from one asyncio loop in this process. TTFT is
counted from the scheduled arrival, not from the moment the call went out, so a client that
falls behind charges its lag to the server the way a real user's wait would (and the same way
the simulator counts it). Prompts are random token ids (seeded): no prefix is shared, and the
lengths are exact; `ignore_eos` makes the outputs exactly as long as the workload says.

    scheduled arrival ──> Generate sent ──> first Delta (TTFT) ──> ... ──> last Delta ──> Final
                          (lag: client)      TPOT = (last - first) / (output tokens - 1)
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import grpc
from tqdm.auto import tqdm

from kv_transfer.stubs import load as load_stubs
from placement.errors import PlacementError
from placement.simulator import RequestResult
from placement.workload import (
    RequestSpec,
    at_rate,
    load_trace,
    poisson_requests,
    scale_lengths,
    workload_preset,
)

PROMPT_IDS = (100, 10_000)  # random prompt tokens come from this id range (every real vocabulary has it)


@dataclass
class Measurement(RequestResult):
    """One request as the client saw it (times in seconds from the start of the run); a request
    that failed counts as `rejected`, so it misses every SLO."""

    sent: float = math.nan
    output_tokens: int = 0
    error: str = ""  # the gRPC status code and message, or the final message's error
    server: dict[str, float] = field(default_factory=dict)  # the Final message's timings


@dataclass(frozen=True)
class LoadSpec:
    target: str  # host:port of the cluster's gRPC endpoint
    auth_token: str | None = None
    seed: int = 0  # of the prompt tokens
    timeout: float = 600.0  # per request, seconds
    progress: bool = True


def prompt_ids(index: int, length: int, seed: int) -> list[int]:
    rng = random.Random(f"{seed}-{index}")
    return [rng.randrange(*PROMPT_IDS) for _ in range(length)]


def run_load(requests: list[RequestSpec], spec: LoadSpec) -> list[Measurement]:
    """Send `requests` at their arrival times and wait for every one to finish or fail."""
    return asyncio.run(_run(requests, spec))


async def _run(requests: list[RequestSpec], spec: LoadSpec) -> list[Measurement]:
    pb, pb_grpc = load_stubs("serving")
    metadata = (("authorization", f"Bearer {spec.auth_token}"),) if spec.auth_token else None
    bar = tqdm(total=len(requests), unit="req", desc="bench", disable=not spec.progress, leave=False)
    # Build every prompt before the clock starts, so the loop only sends and reads.
    calls = [
        pb.GenerateRequest(
            request_id=f"bench-{i}",
            token_ids=pb.TokenIds(ids=prompt_ids(i, r.input_len, spec.seed)),
            sampling=pb.SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True),
        )
        for i, r in enumerate(requests)
    ]
    async with grpc.aio.insecure_channel(spec.target) as channel:
        stub = pb_grpc.PDServeStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()

        async def one(request: RequestSpec, call) -> Measurement:
            m = Measurement(request.arrival, request.input_len, request.output_len)
            await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
            m.sent = time.perf_counter() - start
            try:
                async for response in stub.Generate(call, timeout=spec.timeout, metadata=metadata):
                    now = time.perf_counter() - start
                    if response.HasField("delta") and response.delta.token_ids:
                        if m.output_tokens == 0:
                            m.first_token = now
                        m.last_token = now
                        m.output_tokens += len(response.delta.token_ids)
                    elif response.HasField("final"):
                        final = response.final
                        if final.finish_reason == "error":
                            m.error = final.error or "error"
                        t = final.timings
                        m.server = {
                            k: getattr(t, k) for k in ("queued", "prefill", "transfer", "ttft", "tpot", "e2e")
                        }
            except grpc.aio.AioRpcError as exc:
                m.error = f"{exc.code().name}: {exc.details()}"
            if not m.error and m.output_tokens < request.output_len:
                m.error = f"{m.output_tokens} of {request.output_len} tokens arrived"
            m.rejected = bool(m.error)
            bar.update()
            return m

        try:
            return list(await asyncio.gather(*(one(r, c) for r, c in zip(requests, calls, strict=True))))
        finally:
            bar.close()


# --- the runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """What each run sends: a workload preset (lengths times `length_scale`) with Poisson arrivals,
    or a trace file's requests rescaled to the rate; at most `num_requests`, arriving within
    `duration` seconds when set."""

    workload: str  # a preset name or a JSON-lines trace path
    num_requests: int = 200
    duration: float | None = None
    length_scale: float = 1.0
    seed: int = 0
    max_total_len: int | None = None  # the model's context

    def describe(self) -> str:
        scale = f" x{self.length_scale:g} lengths" if self.length_scale != 1 else ""
        return f"{self.workload}{scale}"

    @cached_property
    def _trace(self) -> list[RequestSpec] | None:
        """The trace's requests with scaled lengths, read once; None for a preset."""
        if Path(self.workload).suffix in (".jsonl", ".json") or Path(self.workload).is_file():
            return scale_lengths(load_trace(self.workload), self.length_scale, self.max_total_len)
        return None

    def at(self, rate: float) -> list[RequestSpec]:
        if self._trace is not None:
            requests = at_rate(self._trace, rate)[: self.num_requests]
        else:
            workload = workload_preset(self.workload).scaled(self.length_scale)
            requests = poisson_requests(workload, rate, self.num_requests, self.seed, self.max_total_len)
        if self.duration is not None:
            requests = [r for r in requests if r.arrival <= self.duration]
        if not requests:
            raise PlacementError(f"no requests arrive within {self.duration} s at {rate:g} req/s")
        return requests
