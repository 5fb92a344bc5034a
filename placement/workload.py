"""What traffic the placement optimizer plans for: request length distributions with presets shaped
like DistServe's three applications, Poisson arrivals, and JSON-lines traces replayed at any rate.

Arrival times are seconds from the start of the traffic (t = 0); a trace's mean rate is its
number of requests over its last arrival time."""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

from placement.errors import PlacementError


@dataclass(frozen=True)
class LengthDistribution:
    """Token counts from a log-normal with this mean and median, clipped to [minimum, maximum]
    (mean and median are the log-normal's, before clipping)."""

    mean: float
    median: float
    minimum: int = 1
    maximum: int = 1 << 20

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.median) and self.mean >= self.median > 0):
            raise PlacementError(
                f"length distribution: need mean >= median > 0, got {self.mean!r} and {self.median!r}"
            )
        if not (isinstance(self.minimum, int) and self.minimum >= 1):
            raise PlacementError(
                f"length distribution: minimum must be an integer >= 1, got {self.minimum!r}"
            )
        if not (isinstance(self.maximum, int) and self.maximum >= self.minimum):
            raise PlacementError(
                f"length distribution: maximum must be an integer >= minimum ({self.minimum}), "
                f"got {self.maximum!r}"
            )

    @property
    def sigma(self) -> float:
        return math.sqrt(2 * math.log(self.mean / self.median))

    def sample(self, rng: random.Random, n: int) -> list[int]:
        mu, sigma = math.log(self.median), self.sigma
        return [min(max(round(rng.lognormvariate(mu, sigma)), self.minimum), self.maximum) for _ in range(n)]

    def scaled(self, factor: float) -> LengthDistribution:
        """Every length times `factor` (the same shape; bounds rounded, at least 1)."""
        return LengthDistribution(
            self.mean * factor,
            self.median * factor,
            max(1, round(self.minimum * factor)),
            max(1, round(self.maximum * factor)),
        )


@dataclass(frozen=True)
class Workload:
    name: str
    input: LengthDistribution
    output: LengthDistribution
    source: str  # where the statistics come from

    def scaled(self, factor: float) -> Workload:
        """The same workload with input and output lengths times `factor`, for hardware too slow
        (or fast) for the real lengths; the name says so."""
        if not (math.isfinite(factor) and factor > 0):
            raise PlacementError(f"length scale must be a positive number, got {factor!r}")
        if factor == 1:
            return self
        return Workload(
            f"{self.name} x{factor:g}",
            self.input.scaled(factor),
            self.output.scaled(factor),
            f"{self.source}; lengths scaled by {factor:g}",
        )


# DistServe (OSDI'24) evaluates a chatbot on ShareGPT, code completion on HumanEval and
# summarization on LongBench, all cut to OPT's 2048-token context. Its preprocessing
# (LLMServe/DistServe, distserve/evaluation/2-benchmark-serving/0-prepare-dataset.py) is cited per preset;
# where no published token statistic was found, the figure is marked as assumed.
WORKLOAD_PRESETS: dict[str, Workload] = {
    # `vllm bench serve` on 1000 ShareGPT conversations (prompt = first turn; kept if prompt <= 1024
    # and prompt + output <= 2048 tokens, both >= 4) counted 229,711 prompt and 203,068 generated
    # Llama-3.1 tokens (vllm-project/vllm PR #18566): means ~230 and ~200, which these parameters
    # give after clipping. Medians are assumed (ShareGPT prompts are right-skewed). DistServe also
    # prepends earlier turns to the prompt, so its inputs run longer; we found no figure for them.
    "chatbot": Workload(
        "chatbot",
        input=LengthDistribution(mean=245, median=150, minimum=4, maximum=1024),
        output=LengthDistribution(mean=205, median=150, minimum=4, maximum=1024),
        source="ShareGPT first turns via vllm bench serve (vllm PR #18566): mean ~230 in, ~200 out; "
        "medians assumed",
    ),
    # HumanEval (164 problems): prompt = signature + docstring, 609.6 characters on average
    # (274-1519) per evalscope's HumanEval page; ~175 tokens at an assumed 3.5 characters per token.
    # DistServe's output is the canonical solution's length; no token count for it was found, so
    # mean 110 / median 90 tokens is assumed (solutions run from one line to a few dozen).
    "code": Workload(
        "code",
        input=LengthDistribution(mean=175, median=160, minimum=64, maximum=512),
        output=LengthDistribution(mean=110, median=90, minimum=8, maximum=512),
        source="HumanEval: prompts 609.6 chars mean (evalscope), ~3.5 chars/token assumed; "
        "output lengths assumed",
    ),
    # LongBench documents average 2k-15k words (LongBench task.md); DistServe truncates each
    # context to a uniform 1900-2048 tokens, which a narrow log-normal (sd ~40 tokens, as the
    # uniform's) centred on 1970 stands in for. LongBench caps summaries at 512 generated tokens
    # (config/dataset2maxlen.json: gov_report, qmsum, vcsum); mean 180 / median 140 is assumed.
    "summarization": Workload(
        "summarization",
        input=LengthDistribution(mean=1970.4, median=1970, minimum=1900, maximum=2048),
        output=LengthDistribution(mean=180, median=140, minimum=16, maximum=512),
        source="LongBench truncated to 1900-2048 tokens as in DistServe's preprocessing; "
        "output lengths assumed (<= 512, LongBench's cap)",
    ),
}


def workload_preset(name: str) -> Workload:
    workload = WORKLOAD_PRESETS.get(name.strip().lower())
    if workload is None:
        raise PlacementError(f"unknown workload {name!r}; known workloads: {', '.join(WORKLOAD_PRESETS)}")
    return workload


@dataclass(frozen=True)
class RequestSpec:
    arrival: float  # seconds from the start of the traffic
    input_len: int
    output_len: int


def poisson_requests(
    workload: Workload, rate: float, num_requests: int, seed: int = 0, max_total_len: int | None = None
) -> list[RequestSpec]:
    """`num_requests` Poisson arrivals at `rate` req/s (the first one gap after t = 0) with lengths
    from `workload`, clipped so input + output <= `max_total_len` (the model's context). The same
    seed gives the same arrival times whatever the workload."""
    if not (math.isfinite(rate) and rate > 0):
        raise PlacementError(f"request rate must be positive req/s, got {rate!r}")
    if num_requests < 0:
        raise PlacementError(f"number of requests must be >= 0, got {num_requests}")
    if max_total_len is not None and max_total_len < 2:
        raise PlacementError(
            f"max_total_len must be >= 2 (one input and one output token), got {max_total_len}"
        )
    arrival_rng, length_rng = random.Random(seed), random.Random(f"lengths-{seed}")
    inputs = workload.input.sample(length_rng, num_requests)
    outputs = workload.output.sample(length_rng, num_requests)
    requests, now = [], 0.0
    for input_len, output_len in zip(inputs, outputs, strict=True):
        now += arrival_rng.expovariate(rate)
        if max_total_len is not None:
            input_len = min(input_len, max_total_len - 1)
            output_len = min(output_len, max_total_len - input_len)
        requests.append(RequestSpec(now, input_len, output_len))
    return requests


_TRACE_KEYS = ("arrival_time", "input_len", "output_len")


def load_trace(path: str | PathLike[str]) -> list[RequestSpec]:
    """A JSON-lines trace, one `{"arrival_time": s, "input_len": n, "output_len": n}` per line
    (other keys ignored, blank lines skipped), arrivals non-decreasing."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PlacementError(f"cannot read trace {path}: {e}") from None
    requests: list[RequestSpec] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            last_arrival = requests[-1].arrival if requests else 0.0
            requests.append(_parse_trace_line(line, f"{path}:{lineno}", last_arrival))
    if not requests:
        raise PlacementError(f"{path}: the trace holds no requests")
    return requests


def _parse_trace_line(line: str, where: str, last_arrival: float) -> RequestSpec:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise PlacementError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(entry, dict):
        raise PlacementError(f"{where}: expected an object with keys {', '.join(_TRACE_KEYS)}")
    missing = [key for key in _TRACE_KEYS if key not in entry]
    if missing:
        raise PlacementError(f"{where}: missing {', '.join(map(repr, missing))}")
    arrival = entry["arrival_time"]
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not math.isfinite(arrival):
        raise PlacementError(f"{where}: arrival_time must be a number of seconds, got {arrival!r}")
    if arrival < 0:
        raise PlacementError(
            f"{where}: arrival_time must be >= 0 (seconds from the trace's start), got {arrival}"
        )
    if arrival < last_arrival:
        raise PlacementError(
            f"{where}: arrival_time {arrival} is before the previous request's {last_arrival}; "
            "arrivals must be non-decreasing (sort the trace)"
        )
    for key in ("input_len", "output_len"):
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlacementError(f"{where}: {key} must be an integer, got {value!r}")
        if value < 1:
            raise PlacementError(f"{where}: {key} must be positive, got {value}")
    return RequestSpec(float(arrival), entry["input_len"], entry["output_len"])


def _mean_rate(requests: list[RequestSpec]) -> float:
    if not requests:
        raise PlacementError("no requests")
    duration = requests[-1].arrival
    return len(requests) / duration if duration > 0 else math.inf


def scale_lengths(
    requests: list[RequestSpec], factor: float, max_total_len: int | None = None
) -> list[RequestSpec]:
    """The same requests (arrivals unchanged) with input and output lengths times `factor`, at
    least 1 each, clipped so input + output <= `max_total_len` when given."""
    if not (math.isfinite(factor) and factor > 0):
        raise PlacementError(f"length scale must be a positive number, got {factor!r}")
    scaled = []
    for r in requests:
        input_len = max(1, round(r.input_len * factor))
        output_len = max(1, round(r.output_len * factor))
        if max_total_len is not None:
            input_len = min(input_len, max_total_len - 1)
            output_len = min(output_len, max_total_len - input_len)
        scaled.append(replace(r, input_len=input_len, output_len=output_len))
    return scaled


def at_rate(requests: list[RequestSpec], rate: float) -> list[RequestSpec]:
    """The same requests with arrival times scaled so that their mean rate is `rate` req/s."""
    if not (math.isfinite(rate) and rate > 0):
        raise PlacementError(f"request rate must be positive req/s, got {rate!r}")
    current = _mean_rate(requests)
    if math.isinf(current):
        raise PlacementError("cannot rescale requests that all arrive at t = 0")
    scale = current / rate
    return [RequestSpec(r.arrival * scale, r.input_len, r.output_len) for r in requests]


def trace_statistics(requests: list[RequestSpec]) -> dict[str, float]:
    """Count, duration, mean rate and mean/median lengths, for printing."""
    rate = _mean_rate(requests)
    inputs = [r.input_len for r in requests]
    outputs = [r.output_len for r in requests]
    return {
        "count": len(requests),
        "duration": requests[-1].arrival,
        "rate": rate,
        "mean_input_len": statistics.fmean(inputs),
        "median_input_len": statistics.median(inputs),
        "mean_output_len": statistics.fmean(outputs),
        "median_output_len": statistics.median(outputs),
    }
