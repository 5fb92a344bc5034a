"""The placement search: which tensor/pipeline parallelism, how many instances of each phase and
which KV codec give the most goodput per GPU under the SLOs. Goodput is the highest request rate
at which the attainment target of requests meets both TTFT and TPOT, found by bisection over
simulated rates (the same requests, arrivals rescaled, so attainment falls smoothly with rate).

    Algorithm 1 (high node affinity, DistServe): each phase alone, one instance per (tp, pp[,
        codec]) -> its goodput; the best per GPU of each phase, replicated to the rate.
    Algorithm 2 (low node affinity): a prefill and a decode instance with the same pp share each
        node stage (tp_p + tp_d <= GPUs per node), so KV moves over the node's link; one unit,
        replicated.
    Colocated: one engine doing both (SARATHI-style mixed steps) per (tp, pp), replicated: the
        baseline; when it ranks first, disaggregation does not pay for this workload.

Every candidate's pools are then simulated together at the target rate (or at its goodput when
the rate is "as high as possible") for the attainment the table reports.

Simplifications, each a choice rather than an oversight:
- A simulated rate runs at most MAX_REQUESTS requests (fewer when the SLOs are short): enough to
  fill the pools and outlast the TTFT SLO, not a steady state of hours.
- Algorithm 2 rates decode behind the best same-node prefill only (not every prefill layout it
  could pair with), as Algorithm 1 does across nodes.
- Decode pipeline stages add throughput (micro-batches) but no latency gain, so decode pp > 1 only
  wins when the weights do not fit otherwise.
- A codec costs its bytes on the link; its encode and decode kernels' time is not modelled (they
  run at GPU copy speed, far below a step's time).
- Only instance counts in whole units of the best layouts are replicated; mixed layouts inside
  one phase (two prefill layouts side by side) are not searched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache

from engine.model_config import ModelConfig
from engine.scheduler import SchedulerConfig
from kernels.kv_quant import layer_nbytes
from placement.errors import PlacementError
from placement.goodput import bisect_goodput
from placement.hardware import ClusterSpec
from placement.latency import LatencyModel, Roofline
from placement.simulator import SLO, PoolSpec, SimCluster, Simulator, TransferSpec
from placement.workload import RequestSpec, at_rate

VERIFIED = 3  # candidates simulated whole
MIN_REQUESTS = 200  # per simulated rate; more when many are in flight at once
MAX_REQUESTS = 4000
MEMORY_UTILIZATION = 0.9  # of each device's memory, as the engine's gpu_memory_utilization
ACTIVATION_RESERVE = 1 << 30  # bytes per device kept for activations and the runtime
CODEC_QUALITY_ORDER = ("none", "fp8", "int8", "int4")  # least lossy first


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"tp{self.tp}pp{self.pp}"


@dataclass(frozen=True)
class SearchSpace:
    """What the search is given. `requests` is a sample at 1 req/s that every rate rescales."""

    model: ModelConfig
    hardware: ClusterSpec
    requests: tuple[RequestSpec, ...]
    slo: SLO
    prefill_scheduler: SchedulerConfig
    decode_scheduler: SchedulerConfig
    colocated_scheduler: SchedulerConfig
    rate: float | None = None  # None: as high as `max_gpus` allows
    max_gpus: int | None = None  # None: the whole cluster
    codecs: tuple[str, ...] = ("none",)
    block_size: int = 16
    kv_memory: dict[str, int | None] = field(default_factory=dict)  # role -> bytes per instance
    layerwise: bool = True
    profiles: tuple = ()  # placement.profiler.Profile: measured latency replaces the roofline
    algorithms: tuple[str, ...] = ("high_affinity", "low_affinity", "colocated")

    @property
    def gpu_budget(self) -> int:
        return min(self.max_gpus or self.hardware.num_gpus, self.hardware.num_gpus)


@dataclass(frozen=True)
class PoolPlan:
    parallelism: Parallelism
    instances: int
    goodput: float  # req/s one instance sustains alone

    @property
    def gpus(self) -> int:
        return self.instances * self.parallelism.gpus


@dataclass(frozen=True)
class Candidate:
    kind: str  # high_affinity | low_affinity | colocated
    prefill: PoolPlan | None
    decode: PoolPlan | None
    colocated: PoolPlan | None
    codec: str
    goodput: float  # req/s the whole deployment sustains
    attainment: float = math.nan  # simulated at the target rate (or at `goodput`)

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in (self.prefill, self.decode, self.colocated) if p is not None)

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput / self.gpus

    def describe(self) -> str:
        if self.colocated is not None:
            return f"colocated {self.colocated.instances}x{self.colocated.parallelism}"
        p, d = self.prefill, self.decode
        affinity = "same-node pairs" if self.kind == "low_affinity" else "any nodes"
        return (
            f"prefill {p.instances}x{p.parallelism} + decode {d.instances}x{d.parallelism}, "
            f"KV {self.codec} ({affinity})"
        )


@dataclass(frozen=True)
class SearchResult:
    space: SearchSpace
    candidates: list[Candidate]  # best first
    rejected: list[str]  # configurations left out, and why
    num_simulations: int


class Planner:
    def __init__(self, space: SearchSpace, bisection_steps: int = 5) -> None:
        self.space = space
        self.bisection_steps = bisection_steps
        self.rejected: list[str] = []
        self.num_simulations = 0
        self._rate_of = cache(self._max_rate)
        requests = space.requests
        self._means = (
            sum(r.input_len for r in requests) / len(requests),
            sum(r.output_len for r in requests) / len(requests),
        )
        self._longest = max(r.input_len + r.output_len for r in requests)

    # --- building blocks ----------------------------------------------------------------------

    def latency(self, par: Parallelism) -> LatencyModel:
        gpu = self.space.hardware.gpu
        for profile in self.space.profiles:
            if profile.hardware == gpu.name and (profile.tp, profile.pp) == (par.tp, par.pp):
                return profile
        return Roofline(self.space.model, gpu, par.tp, par.pp)

    def pool(self, role: str, par: Parallelism, instances: int = 1) -> PoolSpec | str:
        """The pool, or why it cannot exist."""
        space, gpu = self.space, self.space.hardware.gpu
        try:
            roofline = Roofline(space.model, gpu, par.tp, par.pp)
        except PlacementError as exc:
            return str(exc)
        weights = roofline.weight_bytes_per_device()
        room = gpu.memory_bytes * MEMORY_UTILIZATION - ACTIVATION_RESERVE - weights
        if room <= 0:
            return (
                f"{role} {par}: the weights need {weights / 2**30:.1f} GiB per device, more than the "
                f"{gpu.memory_bytes * MEMORY_UTILIZATION / 2**30 - 1:.1f} GiB a {gpu.name} leaves"
            )
        configured = space.kv_memory.get(role)
        kv_bytes = configured if configured is not None else room
        num_blocks = int(kv_bytes // (roofline.kv_bytes_per_token_device() * space.block_size))
        if num_blocks * space.block_size < self._longest:
            return (
                f"{role} {par}: KV room for {num_blocks * space.block_size} tokens per instance, "
                f"less than the longest request ({self._longest} tokens)"
            )
        scheduler = {
            "prefill": space.prefill_scheduler,
            "decode": space.decode_scheduler,
            "colocated": space.colocated_scheduler,
        }[role]
        return PoolSpec(instances, self.latency(par), scheduler, num_blocks, space.block_size, par.gpus)

    def transfer(self, codec: str, same_node: bool) -> TransferSpec:
        m, space = self.space.model, self.space
        bs = space.block_size
        block = layer_nbytes(codec, 1, bs, m.num_kv_heads, m.head_dim, space.hardware.gpu.dtype_bytes)
        bandwidth, latency = space.hardware.link(same_node)
        return TransferSpec(block * m.num_layers / bs, bandwidth, latency, space.layerwise, m.num_layers)

    def attainment(self, cluster: SimCluster, rate: float, stop_below: bool = False) -> float:
        """Simulated attainment at `rate`. The run is long enough to fill the pools (several times
        the requests in flight at once: rate x a request's lifetime, Little's law) and to outlast
        the TTFT SLO, so a high rate is not judged on a burst; at most MAX_REQUESTS requests."""
        self.num_simulations += 1
        lifetime = self._lifetime(cluster)
        # Long enough that a backlog outgrows the TTFT SLO: a short burst fits in a loose SLO
        # even at rates no instance can sustain.
        span = max(3 * lifetime, 2 * (self.space.slo.ttft + lifetime))
        count = int(min(MAX_REQUESTS, len(self.space.requests), max(MIN_REQUESTS, rate * span)))
        requests = at_rate(list(self.space.requests[:count]), rate)
        result = Simulator(cluster).run(requests, self.space.slo, stop_below=stop_below)
        return result.attainment(self.space.slo)

    def _lifetime(self, cluster: SimCluster) -> float:
        """A request's time in the system when it is alone."""
        mean_in, mean_out = self._means
        seconds = 0.0
        for pool in (cluster.prefill, cluster.colocated):
            if pool is not None:
                seconds += pool.latency.prefill_time([(int(mean_in), 0)])
        for pool in (cluster.decode, cluster.colocated):
            if pool is not None:
                seconds += mean_out * pool.latency.decode_time(1, int(mean_in + mean_out / 2))
        return seconds

    def goodput(self, cluster: SimCluster, upper: float | None = None) -> float:
        """The highest rate whose attainment meets the target (0 when even a trickle misses);
        `upper`: a rate known to be about the most it can take."""
        target = self.space.slo.attainment
        return bisect_goodput(
            lambda rate: self.attainment(cluster, rate, stop_below=True) >= target,
            upper or self._first_guess(cluster),
            self.bisection_steps,
        )

    def _first_guess(self, cluster: SimCluster) -> float:
        return max(1e-3, self._bound(cluster) / 2)

    def _bound(self, cluster: SimCluster) -> float:
        """An upper bound on goodput from the latency model alone: prefill at full token budgets
        (pipelined), decode at the largest batch whose step still meets TPOT and fits the KV."""
        mean_in, mean_out = self._means
        slo, bounds = self.space.slo, []
        for pool in (cluster.prefill, cluster.colocated):
            if pool is not None:
                if pool.latency.prefill_time([(int(mean_in), 0)]) > slo.ttft:
                    return 0.0
                budget = pool.scheduler.max_num_batched_tokens
                step = pool.latency.prefill_time([(budget, 0)]) / pool.latency.pp
                bounds.append(pool.instances * budget / (step * mean_in))
        for pool in (cluster.decode, cluster.colocated):
            if pool is not None:
                context = mean_in + mean_out / 2
                fits = pool.num_blocks * pool.block_size / (mean_in + mean_out)
                batch = int(max(1, min(pool.scheduler.max_num_seqs, fits)))
                step = functools.partial(_decode_step, pool.latency, context)
                if step(1) > slo.tpot:
                    return 0.0
                while batch > 1 and step(batch) > slo.tpot:
                    batch //= 2
                bounds.append(pool.instances * batch / (step(batch) * mean_out))
        return min(bounds)

    # --- phases alone -------------------------------------------------------------------------

    def _alone(
        self, role: str, par: Parallelism, codec: str, same_node: bool, before: Parallelism | None = None
    ) -> SimCluster | None:
        """One instance of a phase alone. Decode alone holds each request's reservation for the
        time the `before` prefill configuration takes over its prompt and KV when unloaded (decode
        blocks are reserved at admission, before prefill runs)."""
        pool = self.pool(role, par)
        if isinstance(pool, str):
            self.rejected.append(pool)
            return None
        transfer = self.transfer(codec, same_node)
        if role == "prefill":
            return SimCluster(prefill=pool, transfer=transfer)
        if role == "colocated":
            return SimCluster(colocated=pool)
        stand_in = None
        if before is not None:
            latency = self.latency(before)
            stand_in = _UnloadedPrefill(latency, transfer)
        return SimCluster(decode=pool, prefill_stand_in=stand_in)

    def _max_rate(
        self, role: str, par: Parallelism, codec: str, same_node: bool, before: Parallelism | None
    ) -> float:
        cluster = self._alone(role, par, codec, same_node, before)
        return 0.0 if cluster is None else self.goodput(cluster)

    def rate(
        self,
        role: str,
        par: Parallelism,
        codec: str = "none",
        same_node: bool = False,
        before: Parallelism | None = None,
    ) -> float:
        return self._rate_of(role, par, codec, same_node, before)

    def best(
        self,
        role: str,
        options: list[tuple[Parallelism, str]],
        same_node: bool = False,
        k: int = 3,
        before: Parallelism | None = None,
    ) -> list[tuple[float, Parallelism, str]]:
        """The `k` options with the most goodput per GPU for one phase alone. Options are tried in
        order of their bound per GPU; once a bound is below the k-th best found, the rest cannot
        win and are not simulated."""
        bounded = []
        for par, codec in options:
            cluster = self._alone(role, par, codec, same_node, before)
            if cluster is not None:
                bounded.append((self._bound(cluster) / par.gpus, par, codec))
        bounded.sort(key=lambda item: (-item[0], item[1].gpus, _codec_rank(item[2])))
        found: list[tuple[float, Parallelism, str]] = []
        for bound, par, codec in bounded:
            if len(found) >= k and bound <= _per_gpu(found[k - 1]):
                break
            rate = self.rate(role, par, codec, same_node, before)
            if rate > 0:
                found.append((rate, par, codec))
                found.sort(key=lambda item: -_per_gpu(item))
        return found[:k]

    def parallelisms(self) -> list[Parallelism]:
        """(tp, pp) pairs an instance may use: tp within a node and dividing the heads, at most
        the GPU budget."""
        hw, m = self.space.hardware, self.space.model
        limit = self.space.gpu_budget
        tps = [t for t in (1, 2, 4, 8, 16) if t <= hw.gpus_per_node and m.num_heads % t == 0]
        pps = [p for p in (1, 2, 4, 8) if p <= m.num_layers]
        return [Parallelism(t, p) for t in tps for p in pps if t * p <= limit]

    # --- the search ---------------------------------------------------------------------------

    def search(self, progress: Callable[[str], None] | None = None) -> SearchResult:
        space = self.space
        candidates: list[Candidate] = []
        for algorithm in space.algorithms:
            if progress is not None:
                progress(algorithm)
            candidates += getattr(self, f"_{algorithm}")()
        candidates = [c for c in candidates if c.goodput > 0 and c.gpus <= space.gpu_budget]
        candidates.sort(key=lambda c: (-c.goodput_per_gpu, c.gpus, _codec_rank(c.codec)))
        verified = [self._verify(c) for c in _distinct(candidates)[:VERIFIED]]
        verified.sort(key=lambda c: (-_meets(c, space), -c.goodput_per_gpu, c.gpus, _codec_rank(c.codec)))
        return SearchResult(space, verified, sorted(set(self.rejected)), self.num_simulations)

    def _high_affinity(self) -> list[Candidate]:
        pars = self.parallelisms()
        prefills = self.best("prefill", [(p, c) for p in pars for c in self.space.codecs])
        if not prefills:
            return []
        # Decode is rated behind the best prefill: its reservations wait through that prefill.
        decodes = self.best("decode", [(d, prefills[0][2]) for d in pars], before=prefills[0][1])
        out = []
        for rp, p, codec in prefills:
            for rd, d, _ in decodes:
                out += self._replicate("high_affinity", [("prefill", p, rp), ("decode", d, rd)], codec)
        return out

    def _low_affinity(self) -> list[Candidate]:
        per_node = self.space.hardware.gpus_per_node
        pars = [p for p in self.parallelisms() if p.tp < per_node]
        prefills = self.best("prefill", [(p, c) for p in pars for c in self.space.codecs], True)
        if not prefills:
            return []
        _, first, codec = prefills[0]
        decodes = self.best("decode", [(d, codec) for d in pars], True, k=4, before=first)
        units = [
            (min(rp, rd), p, d, codec, rp, rd)
            for rp, p, codec in prefills
            for rd, d, _ in decodes
            if p.pp == d.pp and p.tp + d.tp <= per_node
        ]
        out = []
        for _, p, d, codec, rp, rd in _top(units, lambda u: u[0] / (u[1].gpus + u[2].gpus)):
            # A unit is one prefill and one decode instance sharing each of its pp nodes.
            n = self._units(min(rp, rd), p, d)
            if n:
                out.append(
                    Candidate(
                        "low_affinity", PoolPlan(p, n, rp), PoolPlan(d, n, rd), None, codec, n * min(rp, rd)
                    )
                )
        return out

    def _colocated(self) -> list[Candidate]:
        out = []
        for r, p, _ in self.best("colocated", [(p, "none") for p in self.parallelisms()]):
            out += self._replicate("colocated", [("colocated", p, r)], "none")
        return out

    def _units(self, unit_rate: float, p: Parallelism, d: Parallelism) -> int:
        hw = self.space.hardware
        fit = hw.nodes * (hw.gpus_per_node // (p.tp + d.tp)) // p.pp
        fit = min(fit, self.space.gpu_budget // (p.gpus + d.gpus))
        if self.space.rate is None:
            return fit
        needed = math.ceil(self.space.rate / unit_rate)
        if needed > fit:
            self.rejected.append(
                f"same-node pairs prefill {p} + decode {d}: the rate needs {needed} pairs, "
                f"the cluster holds {fit}"
            )
            return 0
        return needed

    def _replicate(
        self, kind: str, phases: list[tuple[str, Parallelism, float]], codec: str
    ) -> list[Candidate]:
        """Instance counts for the target rate (or the most goodput within the GPU budget)."""
        if any(r <= 0 for _, _, r in phases):
            return []
        budget, rate = self.space.gpu_budget, self.space.rate
        if rate is not None:
            counts = [math.ceil(rate / r) for _, _, r in phases]
            gpus = sum(n * p.gpus for (_, p, _), n in zip(phases, counts, strict=True))
            if gpus > budget:
                layout = " + ".join(f"{n}x{role} {p}" for (role, p, _), n in zip(phases, counts, strict=True))
                self.rejected.append(f"{layout}: {rate:g} req/s needs {gpus} GPUs, the budget is {budget}")
                return []
        else:
            counts = _best_counts([(p.gpus, r) for _, p, r in phases], budget)
            if counts is None:
                return []
        pools = {role: PoolPlan(p, n, r) for (role, p, r), n in zip(phases, counts, strict=True)}
        goodput = min(n * r for (_, _, r), n in zip(phases, counts, strict=True))
        return [
            Candidate(kind, pools.get("prefill"), pools.get("decode"), pools.get("colocated"), codec, goodput)
        ]

    def _verify(self, candidate: Candidate) -> Candidate:
        """All pools together (router, reservations, transfer, both phases) at the target rate, or
        at the candidate's goodput when the rate is as high as possible. A deployment of g
        identical slices (instance counts with a common factor g) runs as one slice at 1/g of the
        rate."""
        g = _slices(candidate)
        rate = self.space.rate if self.space.rate is not None else candidate.goodput
        attainment = self.attainment(self.whole(candidate, g), rate / g)
        return replace(candidate, attainment=attainment)

    def whole(self, candidate: Candidate, slices: int = 1) -> SimCluster:
        """The candidate's pools together (1/`slices` of each), ready to simulate."""
        plans = {r: getattr(candidate, r) for r in ("prefill", "decode", "colocated")}
        pools = {
            r: self.pool(r, p.parallelism, p.instances // slices) for r, p in plans.items() if p is not None
        }
        transfer = self.transfer(candidate.codec, same_node=candidate.kind == "low_affinity")
        return SimCluster(**pools, transfer=transfer)


def _slices(candidate: Candidate) -> int:
    plans = (candidate.prefill, candidate.decode, candidate.colocated)
    return math.gcd(*(p.instances for p in plans if p is not None))


def _meets(candidate: Candidate, space: SearchSpace) -> bool:
    return candidate.attainment >= space.slo.attainment - 1e-9


def _per_gpu(item: tuple[float, Parallelism, str]) -> float:
    return item[0] / item[1].gpus


def _codec_rank(codec: str) -> int:
    return CODEC_QUALITY_ORDER.index(codec)


def _top(items: Sequence, key: Callable, k: int = 3) -> list:
    """The `k` best by `key` among those with a positive rate (first item)."""
    return sorted((i for i in items if i[0] > 0), key=lambda i: -key(i))[:k]


def _distinct(candidates: list[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for c in candidates:
        key = c.describe()
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _best_counts(phases: list[tuple[int, float]], budget: int) -> list[int] | None:
    """Instance counts within `budget` GPUs maximising the slowest phase's total rate."""
    if len(phases) == 1:
        gpus, _ = phases[0]
        n = budget // gpus
        return [n] if n else None
    (gp, rp), (gd, rd) = phases
    best = None
    for n_p in range(1, budget // gp + 1):
        n_d = (budget - n_p * gp) // gd
        if n_d < 1:
            break
        value = (min(n_p * rp, n_d * rd), -(n_p * gp + n_d * gd))
        if best is None or value > best[0]:
            best = (value, [n_p, n_d])
    return None if best is None else best[1]


def _decode_step(latency: LatencyModel, context: float, batch: int) -> float:
    return latency.decode_time(batch, int(batch * context))


class _UnloadedPrefill:
    """A prompt's prefill on an idle instance and its KV transfer: how long decode alone holds a
    request's reservation. By prompt length, as the same lengths recur over every simulated rate."""

    def __init__(self, latency: LatencyModel, transfer: TransferSpec) -> None:
        self.latency, self.transfer = latency, transfer
        self.seconds: dict[int, float] = {}

    def __call__(self, request: RequestSpec) -> float:
        seconds = self.seconds.get(request.input_len)
        if seconds is None:
            prefill = self.latency.prefill_time([(request.input_len, 0)])
            seconds = self.seconds[request.input_len] = self.transfer.done_at(0.0, prefill, request.input_len)
        return seconds
