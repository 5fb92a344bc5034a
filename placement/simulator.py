"""A discrete-event simulator of a pdserve cluster: requests arrive, the router picks a prefill and
a decode instance, prefill batches run, KV moves, decode batches run, and every request's TTFT and
TPOT come out. The policies are the real ones, not copies: each simulated instance steps an
`engine.scheduler.Scheduler` built from the same `SchedulerConfig` the workers use, admission goes
through `cluster.router.Router`, and KV bytes come from the codec's own payload size.

    arrival ──► Router.admit (decode room?) ──no──► controller queue (bounded) ──► retried on frees
       │ yes: decode blocks reserved
       ▼
    prefill Scheduler.schedule() ──► step of latency.prefill_time(chunks)  (pipelined: next batch
       │                                                                     after a stage)
       ▼ last chunk: first token sampled, blocks handed to the sender
    KV transfer (bytes / link, overlapped with prefill when layer-wise) ──► sender frees its blocks
       ▼ first token reaches the client (TTFT: the controller streams it once decode acked the KV)
    decode Scheduler (adopt) ──► step of latency.decode_time(batch, context) ──► ... ──► last token (TPOT)

`colocated` instances run prefill and decode in one engine (SARATHI-style mixed steps), the
baseline disaggregation has to beat. Where the latency model says instances contend (a CPU
profile: the machine's cores share its memory bandwidth), a step starting while another instance
steps takes `slowdown(its phase, the other's phase)` times as long. A pool left out (`None`)
takes no time: the search measures one phase alone that way, as DistServe's Algorithm 1 does.
"""

from __future__ import annotations

import functools
import gc
import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cluster.router import DecodeLoad, Overloaded, PrefillLoad, Router
from engine.block_manager import blocks_needed
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence as EngineSequence
from placement.latency import PHASES, LatencyModel
from placement.workload import RequestSpec

_UNBOUNDED = 1 << 60


@functools.cache
def _params(output_len: int) -> SamplingParams:
    """A request of `output_len` tokens as the engine sees it: it stops at max_tokens, never at
    EOS (an output of 0 or 1 ends at the first token either way)."""
    return SamplingParams(max_tokens=max(1, output_len), temperature=0.0, ignore_eos=True)


@dataclass(frozen=True)
class PoolSpec:
    """`instances` identical instances of one phase."""

    instances: int
    latency: LatencyModel
    scheduler: SchedulerConfig
    num_blocks: int
    block_size: int = 16
    gpus_per_instance: int = 1


@dataclass(frozen=True)
class TransferSpec:
    """KV from a prefill to a decode instance: `bytes_per_token` of encoded KV (codec and scales
    included) over a link of `bandwidth` bytes/s and `latency` s."""

    bytes_per_token: float = 0.0
    bandwidth: float = math.inf
    latency: float = 0.0
    layerwise: bool = True
    num_layers: int = 1

    def done_at(self, prefill_start: float, prefill_end: float, num_tokens: int) -> float:
        """When the last frame is acknowledged. Layer-wise, layers go out while later ones compute:
        the link finishes a layer after the last layer is computed, or its whole load after the
        first one is, whichever is later."""
        total = self.bytes_per_token * num_tokens / self.bandwidth
        if self.layerwise:
            tail = max(total / self.num_layers, prefill_start + total - prefill_end)
        else:
            tail = total
        return prefill_end + tail + self.latency


@dataclass(frozen=True)
class SimCluster:
    """What is simulated: disaggregated pools (`prefill`, `decode`, either may be None to leave
    that phase out) or, with `colocated`, instances that do both."""

    prefill: PoolSpec | None = None
    decode: PoolSpec | None = None
    colocated: PoolSpec | None = None
    transfer: TransferSpec = TransferSpec()
    max_queue: int = 256  # the controller's bound on requests waiting for room
    # Decode alone: how long each request's reservation is held before its KV lands (the prefill
    # phase it would have gone through); None: no time.
    prefill_stand_in: Callable[[RequestSpec], float] | None = None
    dispatch_delay: float = 1e-3  # arrival -> prefill queue (front end, controller, reserve RPC)
    start_delay: float = 1e-3  # KV acknowledged -> first token at the client and decode start

    def __post_init__(self) -> None:
        if self.colocated is None and self.prefill is None and self.decode is None:
            raise ValueError("simulate at least one pool")
        if self.colocated is not None and (self.prefill or self.decode):
            raise ValueError("a cluster is either colocated or disaggregated")

    @property
    def num_gpus(self) -> int:
        pools = (self.prefill, self.decode, self.colocated)
        return sum(p.instances * p.gpus_per_instance for p in pools if p is not None)


@dataclass(frozen=True)
class SLO:
    ttft: float  # seconds
    tpot: float  # seconds
    attainment: float = 0.9


@dataclass
class RequestResult:
    arrival: float
    input_len: int
    output_len: int
    first_token: float = math.nan  # absolute times; nan while unknown
    last_token: float = math.nan
    rejected: bool = False  # past the queue bound, or never fits the KV cache

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        if self.output_len <= 1:
            return 0.0
        return (self.last_token - self.first_token) / (self.output_len - 1)

    def meets(self, slo: SLO) -> bool:
        return not self.rejected and self.ttft <= slo.ttft and self.tpot <= slo.tpot


def attainment(results: Sequence[RequestResult], slo: SLO) -> float:
    """The fraction of `results` meeting both SLOs (a rejected request meets neither)."""
    return sum(r.meets(slo) for r in results) / max(1, len(results))


@dataclass
class SimResult:
    requests: list[RequestResult]
    stopped_early: bool = False  # too many misses to reach the target; the rest was not run

    def attainment(self, slo: SLO) -> float:
        return 0.0 if self.stopped_early else attainment(self.requests, slo)


# --- instances ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    spec: RequestSpec
    result: RequestResult
    seq_id: str
    seq: EngineSequence | None = None
    decode: _Instance | None = None
    reserved: list[int] = field(default_factory=list)  # decode blocks held for the KV
    missed: bool = False  # counted against the SLO already


class _Instance:
    """One engine: a real Scheduler stepped with simulated step times. The role decides what a
    sequence's first sampled token means: hand the KV off (prefill), continue (colocated), or
    (decode) every step is a decode step."""

    def __init__(self, name: str, role: str, pool: PoolSpec) -> None:
        self.name, self.role, self.pool = name, role, pool
        self.scheduler = Scheduler(pool.scheduler, pool.num_blocks, pool.block_size)
        self.busy = False
        self.phase = ""  # while busy: "decode" (every chunk a decode) or "prefill" (any prompt work)
        self.requests: dict[str, _Request] = {}
        self.pending_tokens = 0  # prompt tokens still to prefill here, the Router's view of the load
        self._unprefilled: dict[str, int] = {}  # seq id -> its share of pending_tokens

    def add(self, request: _Request, prefills_here: bool = True) -> None:
        self.requests[request.seq_id] = request
        if prefills_here:
            self._unprefilled[request.seq_id] = request.spec.input_len
            self.pending_tokens += request.spec.input_len

    def prompt_done(self, seq_id: str) -> None:
        """The sequence's prompt is prefilled (or it left): it no longer counts as pending."""
        self.pending_tokens -= self._unprefilled.pop(seq_id, 0)

    def remove(self, seq_id: str) -> _Request | None:
        self.prompt_done(seq_id)
        return self.requests.pop(seq_id, None)

    def load(self) -> DecodeLoad:
        """What a decode instance or colocated replica reports to the Router (decode_worker's load)."""
        return DecodeLoad(
            free_blocks=self.scheduler.allocator.num_free_blocks,
            block_size=self.pool.block_size,
            running=len(self.requests),
            max_batch=self.pool.scheduler.max_num_seqs,
            pending_tokens=self.pending_tokens,
        )

    def step_time(self, plan: SchedulerOutput) -> float:
        latency = self.pool.latency
        num_decodes = len(plan.decodes)
        context = sum([len(seq.token_ids) for seq in plan.decodes])
        prefills = []
        for c in plan.prefills:  # a one-token prompt's chunk is a decode's work
            if _is_decode(c):
                num_decodes += 1
                context += c.seq.num_tokens
            else:
                prefills.append((c.num_tokens, c.seq.num_computed_tokens))
        if not prefills:
            return latency.decode_time(num_decodes, context)
        if not num_decodes:
            return latency.prefill_time(prefills)
        # One mixed step: both passes' work, the fixed per-step cost once.
        mixed = latency.decode_time(num_decodes, context) + latency.prefill_time(prefills)
        return mixed - latency.decode_time(0, 0)


def _is_decode(chunk: ScheduledChunk) -> bool:
    return chunk.num_tokens == 1 and chunk.seq.num_uncomputed_tokens == 1


class Simulator:
    def __init__(self, cluster: SimCluster, fast_forward: bool = True) -> None:
        self.cluster = cluster
        self.fast_forward = fast_forward

    def run(
        self, requests: Sequence[RequestSpec], slo: SLO | None = None, stop_below: bool = False
    ) -> SimResult:
        """Simulate `requests` to the end. With `slo` and `stop_below`, stop as soon as so many
        requests missed that the attainment target cannot be reached (the goodput search only
        needs to know that)."""
        # A run makes no reference cycles (it unlinks its own at the end), so the cyclic garbage
        # collector has nothing to find in it, yet each of its passes would walk every live
        # sequence's tokens: it is off for the run (a third of the search's time otherwise).
        collecting = gc.isenabled()
        gc.disable()
        try:
            return _Run(self.cluster, requests, slo if stop_below else None, self.fast_forward).run()
        finally:
            if collecting:
                gc.enable()


class _Run:
    def __init__(
        self, cluster: SimCluster, requests: Sequence[RequestSpec], slo: SLO | None, fast_forward: bool
    ) -> None:
        self.cluster = cluster
        self.fast_forward = fast_forward
        self.slo = slo
        self.allowed_misses = math.inf if slo is None else (1 - slo.attainment) * len(requests)
        self.misses = 0
        self.now = 0.0
        self.events: list[tuple[float, int, Callable, tuple]] = []
        self.counter = 0
        self.router = Router(max_waiting=_UNBOUNDED)
        self.queue: deque[_Request] = deque()  # waiting for decode room
        self.results = [RequestResult(r.arrival, r.input_len, r.output_len) for r in requests]
        self.requests = [
            _Request(spec, result, f"r{i}")
            for i, (spec, result) in enumerate(zip(requests, self.results, strict=True))
        ]
        self.arrivals = sorted(self.requests, key=lambda r: r.spec.arrival)  # stable: ties keep order
        self.arrival_times = [r.spec.arrival for r in self.arrivals]
        self.next_arrival = 0  # index into `arrivals`

        def pool(role: str, spec: PoolSpec | None) -> list[_Instance]:
            n = 0 if spec is None else spec.instances
            return [_Instance(f"{role}-{i}", role, spec) for i in range(n)]

        self.prefills = pool("prefill", cluster.prefill)
        self.decodes = pool("decode", cluster.decode)
        self.colocated = pool("colocated", cluster.colocated)
        self.instances = self.prefills + self.decodes + self.colocated
        self.by_name = {i.name: i for i in self.instances}
        # A pool left out is one instance the Router may always pick, with room that never runs out
        # (reported once: what the Router counts against it never binds).
        if not self.prefills:
            self.router.report_prefill("-", PrefillLoad())
        if not self.decodes:
            self.router.report_decode("-", DecodeLoad(_UNBOUNDED, 1, 0, _UNBOUNDED))
        self.contention = len(self.instances) > 1 and any(
            i.pool.latency.slowdown(a, b) != 1.0 for i in self.instances for a in PHASES for b in PHASES
        )

    # --- the event loop -----------------------------------------------------------------------

    def at(self, time: float, fn: Callable, *args) -> None:
        self.counter += 1
        heapq.heappush(self.events, (time, self.counter, fn, args))

    def run(self) -> SimResult:
        # Arrivals are merged in from their own sorted list rather than all pushed up front, which
        # keeps the heap to the events in flight. They come before any other event at the same
        # time, as their place at the head of the heap's order would have put them.
        arrivals, times = self.arrivals, self.arrival_times
        events = self.events
        try:
            while self.next_arrival < len(arrivals) or events:
                i = self.next_arrival
                if i < len(arrivals) and (not events or times[i] <= events[0][0]):
                    self.next_arrival = i + 1
                    self.now = times[i]
                    self.arrive(arrivals[i])
                else:
                    self.now, _, fn, args = heapq.heappop(events)
                    fn(*args)
                if self.misses > self.allowed_misses:
                    return SimResult(self.results, stopped_early=True)
            return SimResult(self.results)
        finally:
            self._unlink()

    def next_event(self) -> float:
        """When the next event happens (an arrival or anything in the heap)."""
        first = self.events[0][0] if self.events else math.inf
        i = self.next_arrival
        return min(first, self.arrival_times[i]) if i < len(self.arrival_times) else first

    def _unlink(self) -> None:
        """Break the run's reference cycles (events hold its bound methods, instances and requests
        point at each other) so that its objects are freed as it returns. Left to the cyclic
        garbage collector, every run's sequences and blocks would pile up between its full passes,
        each of which then walks them all (a third of the search's time)."""
        self.events.clear()
        self.queue.clear()
        for instance in self.instances:
            instance.requests.clear()
        for request in self.requests:
            request.decode = None

    def miss(self, request: _Request) -> None:
        if not request.missed:
            request.missed = True
            self.misses += 1

    def reject(self, request: _Request) -> None:
        request.result.rejected = True
        self.miss(request)

    # --- admission ----------------------------------------------------------------------------

    def arrive(self, request: _Request) -> None:
        if self.queue or not self.admit(request):
            if len(self.queue) >= self.cluster.max_queue:
                self.reject(request)
            else:
                self.queue.append(request)

    def admit(self, request: _Request) -> bool:
        """Route through the real Router with every instance's current load."""
        for inst in self.prefills:
            self.router.report_prefill(inst.name, PrefillLoad(inst.pending_tokens, len(inst.requests)))
        for inst in self.decodes:
            self.router.report_decode(inst.name, inst.load())
        for inst in self.colocated:
            self.router.report_colocated(inst.name, inst.load())
        spec = request.spec
        if spec.input_len + 1 > self._largest_capacity():
            self.reject(request)
            return True
        try:
            route = self.router.admit(spec.input_len, spec.output_len)
        except Overloaded:
            return False
        self.router.waiting = 0  # the simulator keeps its own queue
        if route.decode == route.prefill:  # a colocated replica: its own scheduler holds the KV
            self.dispatch(self.by_name[route.prefill], request)
            return True
        request.decode = self.by_name.get(route.decode)
        if request.decode is not None:
            allocator = request.decode.scheduler.allocator
            request.reserved = allocator.allocate(
                blocks_needed(spec.input_len, request.decode.pool.block_size)
            )
            request.decode.add(request, prefills_here=False)
        prefill = self.by_name.get(route.prefill)
        if prefill is None:  # decode alone: the prompt's KV lands after the stand-in's time
            stand_in = self.cluster.prefill_stand_in
            delay = 0.0 if stand_in is None else stand_in(spec)
            self.at(self.now + delay, self.start_decode, request)
        else:
            self.dispatch(prefill, request)
        return True

    def dispatch(self, instance: _Instance, request: _Request) -> None:
        """Send a routed request to the instance that prefills it. It counts in that instance's load
        from now on, as the real Router counts what it sent until the instance's next report."""
        instance.add(request)
        self.at(self.now + self.cluster.dispatch_delay, self.begin, instance, request)

    def _largest_capacity(self) -> float:
        """The most tokens of KV one instance that keeps the KV (decode or colocated) can hold."""
        keepers = self.decodes or self.colocated
        if not keepers:
            return math.inf
        pool = keepers[0].pool
        return pool.num_blocks * pool.block_size

    def admit_queued(self) -> None:
        while self.queue and self.admit(self.queue[0]):
            self.queue.popleft()

    # --- engines ------------------------------------------------------------------------------

    def begin(self, instance: _Instance, request: _Request) -> None:
        spec = request.spec
        if spec.input_len + 1 > instance.scheduler.capacity_tokens:
            instance.remove(request.seq_id)
            self.release_decode(request)
            self.reject(request)
            return
        seq = EngineSequence(
            request.seq_id, [0] * spec.input_len, spec.input_len, _params(spec.output_len), self.now
        )
        request.seq = seq
        instance.scheduler.add(seq)
        self.kick(instance)

    def kick(self, instance: _Instance) -> None:
        if instance.busy or not instance.scheduler.has_unfinished():
            return
        plan = instance.scheduler.schedule()
        for seq in plan.out_of_memory:
            instance.scheduler.finish(seq, "error")
            request = instance.remove(seq.request_id)
            self.release_decode(request)
            self.reject(request)
        if not plan.decodes and not plan.prefills:
            return  # nothing fits now; a free will kick it again
        instance.busy = True
        if self.contention:  # only `_slowdown` reads it; the search's runs skip the pass
            instance.phase = "decode" if all(_is_decode(c) for c in plan.prefills) else "prefill"
        if self.fast_forward and self._steady(instance, plan):
            self._run_steady(instance, plan.decodes)
            return
        duration = instance.step_time(plan) * self._slowdown(instance)
        pipelined = instance.role == "prefill" and instance.pool.latency.pp > 1
        free_at = self.now + (duration / instance.pool.latency.pp if pipelined else duration)
        self.at(free_at, self.step_done, instance, plan, self.now, self.now + duration)

    def _slowdown(self, instance: _Instance) -> float:
        """The factor on a step `instance` starts now from the instances stepping beside it (the
        one slowing it most; all share one machine where the latency model says they contend)."""
        if not self.contention:
            return 1.0
        latency = instance.pool.latency
        others = (i for i in self.instances if i.busy and i is not instance)
        return max((latency.slowdown(instance.phase, other.phase) for other in others), default=1.0)

    def step_done(self, instance: _Instance, plan: SchedulerOutput, started: float, ended: float) -> None:
        instance.busy = False
        sampled = plan.decodes  # a decode always reaches the end of its tokens
        for seq in sampled:
            seq.num_computed_tokens += 1
        if plan.prefills:
            sampled = list(sampled)
            for chunk in plan.prefills:
                seq = chunk.seq
                seq.num_computed_tokens += chunk.num_tokens
                if seq.num_computed_tokens >= seq.num_tokens:  # a prompt's last chunk
                    sampled.append(seq)
        for seq in sampled:
            seq.token_ids.append(0)
        requests = instance.requests
        if instance.role == "prefill":
            for seq in sampled:
                self.prefilled(instance, requests[seq.request_id], started, ended)
        else:
            for seq in sampled:
                num_output = len(seq.token_ids) - seq.num_prompt_tokens
                if num_output == 1 or num_output >= seq.params.max_tokens:  # its first or last token
                    self.token(instance, requests[seq.request_id], ended)
        self.kick(instance)

    # --- decode fast path -----------------------------------------------------------------------
    # A decode instance whose every running sequence decodes, with nobody waiting, repeats the
    # same schedule step after step until an event (an arrival, a KV landing) happens, a sequence
    # finishes, or blocks run out; the Scheduler would decide nothing else. Those steps are run in
    # one event: same times, same tokens, as many blocks (tests check it against stepping).

    def _steady(self, instance: _Instance, plan: SchedulerOutput) -> bool:
        scheduler = instance.scheduler
        return (
            instance.role == "decode"
            and not scheduler.waiting
            and not plan.prefills
            and len(plan.decodes) == len(scheduler.running)
        )

    def _run_steady(self, instance: _Instance, seqs: list[EngineSequence]) -> None:
        n, latency = len(seqs), instance.pool.latency
        factor = self._slowdown(instance)  # the others' state holds until the next event
        next_event = self.next_event()
        context = sum([len(s.token_ids) for s in seqs])
        end = self.now + latency.decode_time(n, context) * factor
        k, ends = 1, None  # the step the Scheduler just planned; whether a sequence ends in it
        if end < next_event:  # more steps may start before the next event
            k, end, ends = self._more_steps(instance, seqs, context, end, next_event, factor)
        self.at(end, self._steady_done, instance, seqs, k, ends)

    def _more_steps(
        self,
        instance: _Instance,
        seqs: list[EngineSequence],
        context: int,
        end: float,
        next_event: float,
        factor: float,
    ) -> tuple[int, float, bool]:
        """Steps 2, 3, ... of a steady run while they start before `next_event`, no sequence has
        ended and the blocks last: how many steps in all, when the last ends, and whether some
        sequence's last token is the last step's."""
        n, bs, latency = len(seqs), instance.pool.block_size, instance.pool.latency
        # The steps until the first sequence ends, and the sequences by their length's offset
        # within a block: step k + 1 takes a new block for each whose length reaches b*bs + 1.
        steps_left, by_offset = _UNBOUNDED, [[] for _ in range(bs)]
        for s in seqs:
            num_tokens = len(s.token_ids)
            by_offset[num_tokens % bs].append(s)
            left = s.params.max_tokens - (num_tokens - s.num_prompt_tokens)
            if left < steps_left:
                steps_left = left
        allocator = instance.scheduler.allocator
        free, k = allocator.num_free_blocks, 1
        while k < steps_left and end < next_event:
            free -= len(by_offset[(1 - k) % bs])
            if free < 0:
                break
            end += latency.decode_time(n, context + k * n) * factor
            k += 1
        # Every step but the last starts before the next event, so its blocks are taken now, as
        # the Scheduler would take them at each step's start (the first step's it took itself);
        # only the sequences at the offsets steps 2..k reach can need one.
        if k > 1:
            growing = []
            for offset in {(1 - j) % bs for j in range(1, min(k, bs + 1))}:
                for seq in by_offset[offset]:
                    extra = blocks_needed(len(seq.token_ids) + k - 1, bs) - len(seq.block_table)
                    if extra > 0:
                        growing.append((seq, extra))
            blocks, taken = allocator.allocate(sum(extra for _, extra in growing)), 0
            for seq, extra in growing:
                seq.block_table.extend(blocks[taken : taken + extra])
                taken += extra
        return k, end, k >= steps_left

    def _steady_done(
        self, instance: _Instance, seqs: list[EngineSequence], k: int, ends: bool | None
    ) -> None:
        """`ends`: whether a sequence's last token is this step's (None: not known yet)."""
        instance.busy = False
        if k == 1:
            for seq in seqs:
                seq.num_computed_tokens += 1
                seq.token_ids.append(0)
        else:
            tokens = [0] * k
            for seq in seqs:
                seq.num_computed_tokens += k
                seq.token_ids.extend(tokens)
        if ends is not False:  # only those whose last token this was have anything to do
            for seq in [s for s in seqs if len(s.token_ids) - s.num_prompt_tokens >= s.params.max_tokens]:
                self.token(instance, instance.requests[seq.request_id], self.now)
        self.kick(instance)

    def prefilled(self, instance: _Instance, request: _Request, started: float, ended: float) -> None:
        seq = request.seq
        blocks = instance.scheduler.hand_off(seq)
        instance.remove(seq.request_id)
        if request.spec.output_len <= 1:  # its first token is its last: no KV moves
            instance.scheduler.allocator.free(blocks)
            self.release_decode(request)
            self.first_token(request, ended)
            self.finish(request, ended)
            return
        done = self.cluster.transfer.done_at(started, ended, request.spec.input_len)
        self.at(done, self.transferred, instance, request, blocks)

    def transferred(self, instance: _Instance, request: _Request, blocks: list[int]) -> None:
        instance.scheduler.allocator.free(blocks)
        self.kick(instance)
        if request.decode is None:  # prefill alone: the request ends at its first token
            self.first_token(request, self.now + self.cluster.start_delay)
            self.finish(request, self.now + self.cluster.start_delay)
        else:
            self.at(self.now + self.cluster.start_delay, self.start_decode, request)

    def start_decode(self, request: _Request) -> None:
        spec, decode = request.spec, request.decode
        if not math.isfinite(request.result.first_token):
            self.first_token(request, self.now)
        seq = EngineSequence(
            request.seq_id, [0] * spec.input_len, spec.input_len, _params(spec.output_len), self.now
        )
        seq.block_table, request.reserved = request.reserved, []
        seq.num_computed_tokens = spec.input_len
        seq.token_ids.append(0)  # the first token, sampled by prefill
        request.seq = seq
        decode.scheduler.adopt(seq)
        self.kick(decode)

    def token(self, instance: _Instance, request: _Request, when: float) -> None:
        seq = request.seq
        if not math.isfinite(request.result.first_token):
            self.first_token(request, when)  # colocated: its prefill just ended
            instance.prompt_done(seq.request_id)
        if seq.num_output_tokens >= request.spec.output_len:
            instance.scheduler.finish(seq, "length")
            instance.remove(seq.request_id)
            self.finish(request, when)
            if instance.role != "prefill":  # its KV room is free again
                self.admit_queued()

    def first_token(self, request: _Request, when: float) -> None:
        request.result.first_token = when
        if self.slo is not None and request.result.ttft > self.slo.ttft:
            self.miss(request)

    def finish(self, request: _Request, when: float) -> None:
        result = request.result
        result.last_token = when
        if self.slo is not None and result.tpot > self.slo.tpot:
            self.miss(request)

    def release_decode(self, request: _Request) -> None:
        decode = request.decode
        if decode is None:
            return
        if request.reserved:
            decode.scheduler.allocator.free(request.reserved)
            request.reserved = []
        decode.remove(request.seq_id)
        self.admit_queued()
