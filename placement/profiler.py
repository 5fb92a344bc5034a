"""Step times of the real engine over a grid of batch shapes, fitted to DistServe's latency forms;
the placement optimizer uses a profile instead of its roofline model when one is given.

    prefill step over chunks (new, past):  t = a + b * sum(new) + c * sum(new * (new + 2 * past))
    decode step over contexts ctx:         t = a + b * sum(ctx) + c * len(ctx)

`past` is the tokens of that sequence already in the KV cache (0 for an unchunked prompt), so the
last term is proportional to a chunk's causal attention work; `ctx` counts a decoding sequence's
tokens in the cache including the new one. Times are seconds of one engine step (schedule,
forward, sample): what a worker's loop times around `engine.step()`, the median of `repeats`
timings per shape taken in passes over the whole grid (so a burst of other work on a shared
machine spoils one timing of many shapes, not every timing of one). Each form is fitted by least
relative error with non-negative coefficients.

A profile file is JSON::

    {
      "format": 1,
      "model": "smollm2-135m",          the config's model.name
      "hardware": "cpu",                 "cpu" or a GPU kind such as "h100-80gb"
      "tp": 1, "pp": 1,                  the parallelism the steps ran with
      "dtype": "float32",
      "created": "2025-01-31T12:00:00+00:00",
      "prefill": {"a": s, "b": s/token, "c": s/token^2},
      "decode": {"a": s, "b": s/context token, "c": s/sequence},
      "fit_error": {"prefill": {"median": r, "max": r}, "decode": {...}},   relative, on the samples
      "contention": {"decode": {"decode": f, "prefill": f}, "prefill": {...}},   optional (CPU)
      "samples": {
        "prefill": [{"chunks": [[new, past], ...], "seconds": median, "runs": [s, ...]}, ...],
        "decode": [{"contexts": [ctx, ...], "seconds": median, "runs": [s, ...]}, ...],
        "environment": {...}             how they were taken (device, threads, repeats, block size)
      }
    }

`fit(profile.samples)` redoes the fits from the stored measurements.

`contention[phase][other]` is how many times longer a `phase` step takes while another engine
process on the same machine runs `other` steps back to back (the median over a few shapes,
measured beside a real co-running engine): on a CPU the cores share the memory bandwidth, so two
instances that both decode slow each other down, which a profile of one engine alone misses. The
simulator applies it to steps that start while another instance steps. Absent (GPUs, where each
instance has its own memory, or older files): 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from placement.errors import PlacementError
from placement.latency import PHASES

if TYPE_CHECKING:
    from cluster.config import ClusterConfig
    from engine.engine_config import EngineConfig
    from engine.llm_engine import LLMEngine

FORMAT = 1
START_TIMEOUT_S = 600.0  # for the co-running engine to load
DEFAULT_REPEATS = 5  # timings per shape; the median is kept
DEFAULT_PREFILL_BATCHES = (1, 2, 4)
DEFAULT_DECODE_BATCHES = (1, 4, 16, 64)
DEFAULT_DECODE_CONTEXTS = (128, 512, 1024)


# --- the latency forms ----------------------------------------------------------------------------


def _check_coefficients(fit: PrefillFit | DecodeFit) -> None:
    for name in ("a", "b", "c"):
        value = getattr(fit, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise PlacementError(f"{type(fit).__name__}.{name} must be a finite number, got {value!r}")
        if value < 0:
            raise PlacementError(f"{type(fit).__name__}.{name} must be >= 0, got {value!r}")
        object.__setattr__(fit, name, float(value))


@dataclass(frozen=True, slots=True)
class PrefillFit:
    a: float  # seconds per step
    b: float  # seconds per new token
    c: float  # seconds per unit of new * (new + 2 * past)

    def __post_init__(self) -> None:
        _check_coefficients(self)

    def time(self, chunks: Sequence[tuple[int, int]]) -> float:
        """Seconds of one step over (new tokens, past tokens) chunks (`a` for none: the fixed cost)."""
        tokens = work = 0
        for new, past in chunks:
            tokens += new
            work += new * (new + 2 * past)
        return self.a + self.b * tokens + self.c * work


@dataclass(frozen=True, slots=True)
class DecodeFit:
    a: float  # seconds per step
    b: float  # seconds per context token
    c: float  # seconds per sequence

    def __post_init__(self) -> None:
        _check_coefficients(self)

    def time(self, contexts: Sequence[int]) -> float:
        """Seconds of one decode step over sequences with these context lengths."""
        return self.a + self.b * sum(contexts) + self.c * len(contexts)


# --- the profile file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    model: str
    hardware: str
    tp: int
    pp: int
    dtype: str
    prefill: PrefillFit
    decode: DecodeFit
    samples: dict = field(default_factory=dict)
    created: str = ""
    fit_error: dict = field(default_factory=dict)
    contention: dict = field(default_factory=dict)  # {phase: {other phase: factor}}, see the module doc

    # --- placement.latency.LatencyModel ---------------------------------------------------------

    def prefill_time(self, chunks: Sequence[tuple[int, int]]) -> float:
        return self.prefill.time(chunks)

    def decode_time(self, num_seqs: int, num_context: int) -> float:
        """One token for each of `num_seqs` sequences whose contexts sum to `num_context`
        (decode_time(0, 0) is the fixed per-step cost, as the simulator expects)."""
        d = self.decode
        return d.a + d.b * num_context + d.c * num_seqs

    def slowdown(self, phase: str, other: str) -> float:
        return float(self.contention.get(phase, {}).get(other, 1.0))

    def scaled(self, prefill: float, decode: float) -> Profile:
        """Every prefill step `prefill` times as long and every decode step `decode` times (a
        calibration against the serving path, which adds to the engine's own step)."""
        if not (prefill > 0 and decode > 0):
            raise PlacementError(f"calibration factors must be positive, got {prefill!r} and {decode!r}")
        p, d = self.prefill, self.decode
        return replace(
            self,
            prefill=PrefillFit(p.a * prefill, p.b * prefill, p.c * prefill),
            decode=DecodeFit(d.a * decode, d.b * decode, d.c * decode),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "hardware": self.hardware,
            "tp": self.tp,
            "pp": self.pp,
            "dtype": self.dtype,
            "created": self.created,
            "prefill": dataclasses.asdict(self.prefill),
            "decode": dataclasses.asdict(self.decode),
            "fit_error": self.fit_error,
            "contention": self.contention,
            "samples": self.samples,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(_dump(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile file; raises PlacementError naming the file and what is wrong."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise PlacementError(f"{path}: cannot read the profile ({exc.strerror or exc})") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlacementError(f"{path}: not a profile: not valid JSON ({exc})") from None
        try:
            return _from_dict(data)
        except PlacementError as exc:
            raise PlacementError(f"{path}: {exc}") from None


_FIELDS = {
    "format": int,
    "model": str,
    "hardware": str,
    "tp": int,
    "pp": int,
    "dtype": str,
    "created": str,
    "prefill": dict,
    "decode": dict,
    "fit_error": dict,
    "contention": dict,
    "samples": dict,
}
_OPTIONAL = {"contention": {}}


def _from_dict(data: Any) -> Profile:
    if not isinstance(data, dict):
        raise PlacementError(f"not a profile: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise PlacementError(
            f"profile format {data.get('format')!r} is not supported (this pdserve reads format {FORMAT}); "
            "profile the engine again"
        )
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise PlacementError(f"unknown key {unknown[0]!r}; a profile has: {', '.join(_FIELDS)}")
    data = {**_OPTIONAL, **data}
    for key, kind in _FIELDS.items():
        if key not in data:
            raise PlacementError(f"missing key {key!r}")
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise PlacementError(f"{key} must be a JSON {kind.__name__}, got {value!r}")
    for key in ("tp", "pp"):
        if data[key] < 1:
            raise PlacementError(f"{key} must be >= 1, got {data[key]}")
    fits = {}
    for key, cls in (("prefill", PrefillFit), ("decode", DecodeFit)):
        coefficients = data[key]
        if sorted(coefficients) != ["a", "b", "c"]:
            raise PlacementError(
                f"{key} must have exactly the coefficients a, b, c, got {sorted(coefficients)}"
            )
        try:
            fits[key] = cls(**coefficients)
        except PlacementError as exc:
            raise PlacementError(f"{key}: {exc}") from None
    _check_contention(data["contention"])
    rest = {k: v for k, v in data.items() if k not in ("format", "prefill", "decode")}
    return Profile(prefill=fits["prefill"], decode=fits["decode"], **rest)


def _check_contention(contention: dict) -> None:
    for phase, row in contention.items():
        if phase not in PHASES or not isinstance(row, dict):
            raise PlacementError(
                f"contention: expected {{phase: {{phase: factor}}}} over {PHASES}, got {phase!r}"
            )
        for other, factor in row.items():
            ok = isinstance(factor, int | float) and not isinstance(factor, bool) and 0 < factor < 100
            if other not in PHASES or not ok:
                raise PlacementError(
                    f"contention.{phase}.{other} must be a factor in (0, 100), got {factor!r}"
                )


def _dump(value: Any, depth: int = 0) -> str:
    """JSON with the top levels indented and each sample on one line."""
    if depth >= 3 or not isinstance(value, dict | list) or not value:
        return json.dumps(value, allow_nan=False)
    pad, end = "  " * (depth + 1), "  " * depth
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(str(k))}: {_dump(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{end}}}"
    return "[\n" + ",\n".join(pad + _dump(v, depth + 1) for v in value) + f"\n{end}]"


# --- fitting --------------------------------------------------------------------------------------


def _nonnegative_relative_fit(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Coefficients x >= 0 minimising sum(((features @ x - seconds) / seconds)^2).

    Exact NNLS for three terms: the optimum is the least-squares solution on its support, so try
    every support and keep the best one whose coefficients are all non-negative."""
    rows = features / seconds[:, None]  # relative error: each row divided by its measurement
    target = np.ones(len(seconds))
    scale = np.linalg.norm(rows, axis=0)
    scale[scale == 0] = 1.0
    rows = rows / scale  # columns differ by orders of magnitude (1, tokens, tokens^2)
    best, best_residual = np.zeros(features.shape[1]), float(len(seconds))  # all-zero: residual n
    for size in range(1, features.shape[1] + 1):
        for support in itertools.combinations(range(features.shape[1]), size):
            cols = list(support)
            solution = np.linalg.lstsq(rows[:, cols], target, rcond=None)[0]
            if np.any(solution < 0):
                continue
            x = np.zeros(features.shape[1])
            x[cols] = solution
            residual = float(np.sum((rows @ x - target) ** 2))
            if residual < best_residual - 1e-12 * len(seconds):
                best, best_residual = x, residual
    return best / scale


def _table(samples: dict, phase: str, key: str) -> tuple[list, np.ndarray]:
    entries = samples.get(phase) if isinstance(samples, dict) else None
    if not entries:
        raise PlacementError(f"samples have no {phase} measurements to fit")
    shapes, seconds = [], []
    for i, entry in enumerate(entries):
        try:
            shape, t = entry[key], float(entry["seconds"])
        except (TypeError, KeyError, ValueError) as exc:
            raise PlacementError(f"samples.{phase}[{i}]: needs {key!r} and 'seconds' ({exc!r})") from None
        if not t > 0 or not shape:
            raise PlacementError(f"samples.{phase}[{i}]: needs a non-empty {key} and seconds > 0")
        shapes.append(shape)
        seconds.append(t)
    return shapes, np.array(seconds)


def _errors(predicted: Sequence[float], seconds: np.ndarray) -> dict[str, float]:
    relative = np.abs(np.array(predicted) - seconds) / seconds
    return {"median": float(np.median(relative)), "max": float(np.max(relative))}


def fit(samples: dict) -> tuple[PrefillFit, DecodeFit, dict]:
    """Both latency forms fitted to measurements (layout as in a profile's "samples"), and each
    fit's median and max relative error on them."""
    chunks, prefill_s = _table(samples, "prefill", "chunks")
    features = np.array(
        [[1.0, sum(n for n, _ in c), sum(n * (n + 2 * p) for n, p in c)] for c in chunks], dtype=float
    )
    prefill = PrefillFit(*_nonnegative_relative_fit(features, prefill_s).tolist())
    contexts, decode_s = _table(samples, "decode", "contexts")
    features = np.array([[1.0, sum(c), len(c)] for c in contexts], dtype=float)
    decode = DecodeFit(*_nonnegative_relative_fit(features, decode_s).tolist())
    errors = {
        "prefill": _errors([prefill.time(c) for c in chunks], prefill_s),
        "decode": _errors([decode.time(c) for c in contexts], decode_s),
    }
    return prefill, decode, errors


# --- measuring ------------------------------------------------------------------------------------


def _default_lengths(longest: int) -> list[int]:
    """Powers of two from 16 up to `longest`, and `longest` itself."""
    return [n for n in (2**i for i in range(4, 31)) if n < longest] + [longest]


def _check_grid(name: str, values: Sequence[int], low: int, high: int, why: str) -> None:
    if not values:
        raise PlacementError(f"{name} is empty; give at least one value")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high]
    if bad:
        raise PlacementError(
            f"{name}: {bad} out of range; each must be an integer in [{low}, {high}] ({why})"
        )


def _prefill_shapes(
    config: ClusterConfig,
    max_len: int,
    lengths: Sequence[int] | None,
    batches: Sequence[int] | None,
    chunked: Sequence[tuple[int, int]] | None,
) -> list[tuple[int, int, int]]:
    """(prompts, new tokens, past tokens) of each prefill step: every prompt length at every batch
    size whose tokens fit one step's budget, then single chunked prompts (past a multiple of the
    chunk size, so the engine's own chunking reaches it)."""
    chunk, budget = config.prefill.chunk_size, config.prefill.max_num_batched_tokens
    longest = min(chunk, max_len - 1)
    lengths = _default_lengths(longest) if lengths is None else lengths
    batches = DEFAULT_PREFILL_BATCHES if batches is None else batches
    if chunked is None:
        chunked = [(n, chunk) for n in sorted({max(1, chunk // 4), chunk}) if chunk + n < max_len]
    _check_grid("prefill_lengths", lengths, 1, longest, "prefill.chunk_size and the context length")
    _check_grid("prefill_batches", batches, 1, budget, "prefill.max_num_batched_tokens")
    shapes = [(k, n, 0) for n in sorted(set(lengths)) for k in sorted(set(batches)) if k * n <= budget]
    for new, past in chunked:
        _check_grid("prefill_chunked new", [new], 1, chunk, "prefill.chunk_size")
        _check_grid("prefill_chunked past", [past], chunk, max_len - 1 - new, "the context length")
        if past % chunk:
            raise PlacementError(
                f"prefill_chunked past ({past}) must be a multiple of prefill.chunk_size ({chunk})"
            )
        shapes.append((1, new, past))
    if not shapes:
        raise PlacementError(
            f"no prefill shape fits one step: every prefill_lengths x prefill_batches exceeds "
            f"prefill.max_num_batched_tokens ({budget})"
        )
    return shapes


def _decode_shapes(
    config: ClusterConfig, max_len: int, batches: Sequence[int] | None, contexts: Sequence[int] | None
) -> list[tuple[int, int]]:
    """(sequences, context length) of each decode step."""
    max_batch = config.decode.max_batch
    if batches is None:
        batches = sorted({b for b in DEFAULT_DECODE_BATCHES if b < max_batch} | {max_batch})
    if contexts is None:
        contexts = [c for c in DEFAULT_DECODE_CONTEXTS if c <= max_len] or [max_len]
    _check_grid("decode_batches", batches, 1, 1 << 20, "a number of sequences")
    _check_grid(
        "decode_contexts", contexts, 2, max_len, "at least one prompt token, within the context length"
    )
    return [(b, c) for c in sorted(set(contexts)) for b in sorted(set(batches))]


class _Bench:
    """One engine, stepped in exact shapes: prompts that finish after their prefill step, and
    sequences adopted with their prompt's KV (contents irrelevant) that finish after one decode."""

    def __init__(self, engine: LLMEngine) -> None:
        from engine.sampling_params import SamplingParams

        self.engine = engine
        self.rng = random.Random(0)
        self.ids = itertools.count()
        self.prefill_params = SamplingParams(max_tokens=1, ignore_eos=True)
        self.decode_params = SamplingParams(max_tokens=2, ignore_eos=True)

    def _tokens(self, n: int) -> list[int]:
        vocab = self.engine.vocab_size
        return [self.rng.randrange(vocab) for _ in range(n)]

    def _step(self) -> tuple[float, list]:
        import torch

        device = self.engine.runner.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = perf_counter()
        outputs = self.engine.step()
        return perf_counter() - began, outputs

    def prefill(self, prompts: int, new: int, past: int) -> float:
        engine = self.engine
        for _ in range(prompts):
            engine.add_request(self._tokens(past + new), self.prefill_params)
        scheduler = engine.scheduler
        while past and (scheduler.waiting or any(s.num_computed_tokens < past for s in scheduler.running)):
            engine.step()  # the earlier chunks, untimed
        queued = [*scheduler.waiting, *scheduler.running]
        if len(queued) != prompts or any(s.num_computed_tokens != past for s in queued):
            raise PlacementError(f"the engine did not reach the prefill shape {prompts} x ({new}, {past})")
        seconds, outputs = self._step()
        self._check(outputs, prompts, f"{prompts} x ({new}, {past})")
        return seconds

    def decode(self, sequences: int, context: int) -> float:
        from engine.block_manager import blocks_needed

        engine = self.engine
        for _ in range(sequences):
            blocks = engine.scheduler.allocator.allocate(
                blocks_needed(context - 1, engine.scheduler.block_size)
            )
            first = self.rng.randrange(engine.vocab_size)
            engine.add_prefilled(
                f"profile-{next(self.ids)}", self._tokens(context - 1), first, self.decode_params, blocks
            )
        seconds, outputs = self._step()
        self._check(outputs, sequences, f"{sequences} x context {context}")
        return seconds

    def _check(self, outputs: list, expected: int, shape: str) -> None:
        """The timed step ran the whole shape: each request got its token and finished, blocks freed."""
        engine = self.engine
        done = [o for o in outputs if o.finished and o.finish_reason == "length" and o.error is None]
        if len(done) != expected or engine.has_unfinished_requests():
            raise PlacementError(f"the profiled step was not the whole shape {shape}")
        if engine.num_free_blocks != engine.scheduler.allocator.num_blocks:
            raise PlacementError(f"KV blocks were not all freed after the shape {shape}")


def measure(
    config: ClusterConfig,
    *,
    prefill_lengths: Sequence[int] | None = None,
    prefill_batches: Sequence[int] | None = None,
    prefill_chunked: Sequence[tuple[int, int]] | None = None,
    decode_batches: Sequence[int] | None = None,
    decode_contexts: Sequence[int] | None = None,
    repeats: int = DEFAULT_REPEATS,
    progress: bool = True,
    contention: bool = True,
) -> dict:
    """Time one engine step for every shape of the grid (the median of `repeats`); returns samples
    as in a profile's "samples".

    The engine is the workers' (cluster.instance.engine_config: model, dtype, device, chunk size)
    with a KV cache sized for the largest shape, on as many threads as each pool's `cpus`.
    Grids left None come from the config: prompt lengths 16, 32, ... up to prefill.chunk_size in
    batches of 1, 2 and 4 within the step's token budget, prompts of chunk_size/4 and chunk_size
    tokens chunked after one chunk_size chunk, and decode batches 1, 4, 16, 64 (up to
    decode.max_batch) at contexts 128, 512 and 1024 tokens.

    With `contention`, on a CPU of two cores or more, a few of the shapes are timed again beside
    a second engine process stepping prefill, then decode, back to back: samples["contention"]
    holds the factors (the module doc) and the times they come from."""
    import torch

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise PlacementError(f"repeats must be an integer >= 1, got {repeats!r}")
    if prefill_lengths is not None:  # the ranges that need no model, checked before loading it
        _check_grid("prefill_lengths", prefill_lengths, 1, config.prefill.chunk_size, "prefill.chunk_size")
    base, loaded, max_len = _load(config)
    prefill = _prefill_shapes(config, max_len, prefill_lengths, prefill_batches, prefill_chunked)
    decode = _decode_shapes(config, max_len, decode_batches, decode_contexts)
    warmup_prefill = (1, min(64, prefill[0][1]), 0)
    warmup_decode = (min(4, decode[0][0]), decode[0][1])

    engine = _profiling_engine(config, loaded, prefill, decode)
    bench = _Bench(engine)
    threads = {"prefill": max(1, int(config.prefill.cpus)), "decode": max(1, int(config.decode.cpus))}
    shapes = len(prefill) + len(decode)
    if progress:
        print(
            f"profiling {base.model} on {engine.runner.device}: {shapes} shapes "
            f"({len(prefill)} prefill, {len(decode)} decode) x {repeats} runs",
            file=sys.stderr,
        )
    samples: dict[str, Any] = {"prefill": [], "decode": []}
    previous_threads = torch.get_num_threads()
    steps = shapes * repeats
    try:
        with tqdm(total=steps, desc=f"profiling {base.model}", unit="step", disable=not progress) as bar:
            torch.set_num_threads(threads["prefill"])
            for _ in range(2):
                bench.prefill(*warmup_prefill)
            runs = _interleaved(prefill, repeats, lambda shape: bench.prefill(*shape), bar)
            for (k, new, past), times in zip(prefill, runs, strict=True):
                samples["prefill"].append(_sample("chunks", [[new, past]] * k, times))
            torch.set_num_threads(threads["decode"])
            for _ in range(2):
                bench.decode(*warmup_decode)
            runs = _interleaved(decode, repeats, lambda shape: bench.decode(*shape), bar)
            for (b, ctx), times in zip(decode, runs, strict=True):
                samples["decode"].append(_sample("contexts", [ctx] * b, times))
        if contention and engine.runner.device.type == "cpu" and (os.cpu_count() or 1) >= 2:
            if progress:
                print("timing a few shapes beside a co-running engine (contention)", file=sys.stderr)
            samples["contention"] = _measure_contention(config, bench, threads, prefill, decode, repeats)
    finally:
        torch.set_num_threads(previous_threads)
    samples["environment"] = {
        "device": str(engine.runner.device),
        "threads": threads,
        "repeats": repeats,
        "block_size": base.block_size,
        "torch": torch.__version__,
    }
    return samples


def _load(config: ClusterConfig) -> tuple[EngineConfig, Any, int]:
    """The workers' engine settings (cluster.instance.engine_config), the model loaded for them,
    and the longest sequence it takes."""
    from cluster.instance import engine_config
    from engine.model_loader import load_model

    base = engine_config(config, "prefill")
    loaded = load_model(base.model, base.torch_dtype, base.torch_device, seed=base.seed)
    return base, loaded, min(base.max_model_len or loaded.config.max_model_len, loaded.config.max_model_len)


def _profiling_engine(
    config: ClusterConfig,
    loaded: Any,
    prefill: Sequence[tuple[int, int, int]],
    decode: Sequence[tuple[int, int]],
) -> LLMEngine:
    """The workers' engine (cluster.instance.engine_config) over `loaded`, with a KV cache and
    batch limits that hold the largest of the shapes."""
    from cluster.instance import engine_config
    from engine.block_manager import blocks_needed
    from engine.kv_cache import block_bytes
    from engine.llm_engine import LLMEngine

    base = engine_config(config, "prefill")
    bs = base.block_size
    blocks = max(
        [k * blocks_needed(new + past + 1, bs) for k, new, past in prefill]  # + the sampled token
        + [b * blocks_needed(ctx, bs) for b, ctx in decode]
    )
    most_seqs = max([k for k, _, _ in prefill] + [b for b, _ in decode])
    return LLMEngine(
        dataclasses.replace(
            base,
            kv_cache_memory=blocks * block_bytes(loaded.config, bs, base.torch_dtype),
            max_num_seqs=most_seqs,
            max_num_batched_tokens=max(config.prefill.max_num_batched_tokens, most_seqs),
        ),
        loaded=loaded,
    )


def _co_runner_shape(config: ClusterConfig, phase: str, max_len: int) -> tuple[int, ...]:
    """What the co-running engine repeats: one prompt chunk, or a decode batch mid-sized."""
    if phase == "prefill":
        return (1, min(256, config.prefill.chunk_size, max_len - 1), 0)
    return (min(16, config.decode.max_batch), min(512, max_len - 1))


def _co_runner_main(config: ClusterConfig, phase: str, threads: int, ready: Any, stop: Any) -> None:
    """A second engine process stepping `phase` back to back until `stop` is set."""
    import torch

    torch.set_num_threads(threads)
    _, loaded, max_len = _load(config)
    shape = _co_runner_shape(config, phase, max_len)
    prefills, decodes = ([shape], []) if phase == "prefill" else ([], [shape])
    bench = _Bench(_profiling_engine(config, loaded, prefills, decodes))
    step = bench.prefill if phase == "prefill" else bench.decode
    for _ in range(2):
        step(*shape)
    ready.set()
    while not stop.is_set():
        step(*shape)


def _contention_shapes(
    prefill: Sequence[tuple[int, int, int]], decode: Sequence[tuple[int, int]]
) -> tuple[list, list]:
    """A few shapes of each grid to time beside a co-runner: the longest single prompt and one of
    half its length; the smallest and a mid-sized decode batch at a middle context."""
    singles = sorted((s for s in prefill if s[0] == 1 and s[2] == 0), key=lambda s: s[1]) or list(prefill)
    contexts = sorted({ctx for _, ctx in decode})
    middle = contexts[len(contexts) // 2]
    batches = sorted(b for b, ctx in decode if ctx == middle)
    return [singles[len(singles) // 2], singles[-1]], [
        (batches[0], middle),
        (batches[len(batches) // 2], middle),
    ]


def _measure_contention(
    config: ClusterConfig,
    bench: _Bench,
    threads: dict[str, int],
    prefill: Sequence[tuple[int, int, int]],
    decode: Sequence[tuple[int, int]],
    repeats: int,
) -> dict:
    """Time a few shapes alone, then beside a co-running engine process of each phase; the
    factors are the medians of the ratios (see the module doc)."""
    import multiprocessing as mp

    import torch

    prefill_shapes, decode_shapes = _contention_shapes(prefill, decode)

    def timed() -> dict[str, list[float]]:
        torch.set_num_threads(threads["prefill"])
        runs = _interleaved(prefill_shapes, repeats, lambda shape: bench.prefill(*shape))
        times = {"prefill": [statistics.median(r) for r in runs]}
        torch.set_num_threads(threads["decode"])
        runs = _interleaved(decode_shapes, repeats, lambda shape: bench.decode(*shape))
        times["decode"] = [statistics.median(r) for r in runs]
        return times

    ctx = mp.get_context("spawn")
    shapes = {"prefill": [list(s) for s in prefill_shapes], "decode": [list(s) for s in decode_shapes]}
    runs: dict[str, Any] = {"shapes": shapes, "alone": timed()}
    factors: dict[str, dict[str, float]] = {phase: {} for phase in PHASES}
    for other in PHASES:
        ready, stop = ctx.Event(), ctx.Event()
        process = ctx.Process(
            target=_co_runner_main, args=(config, other, threads[other], ready, stop), daemon=True
        )
        process.start()
        try:
            deadline = perf_counter() + START_TIMEOUT_S
            while not ready.wait(0.5):
                if not process.is_alive():
                    raise PlacementError(f"the co-running {other} engine exited (code {process.exitcode})")
                if perf_counter() > deadline:
                    raise PlacementError(
                        f"the co-running {other} engine did not start in {START_TIMEOUT_S:g} s"
                    )
            beside = timed()
        finally:
            stop.set()
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        runs[f"beside {other}"] = beside
        for phase in PHASES:
            ratios = [b / a for b, a in zip(beside[phase], runs["alone"][phase], strict=True)]
            factors[phase][other] = round(max(1.0, statistics.median(ratios)), 4)
    return {"factors": factors, "runs": runs}


def _interleaved(
    shapes: Sequence[tuple], repeats: int, step: Callable[[tuple], float], bar: Any = None
) -> list[list[float]]:
    """Each shape's `repeats` timings, taken in passes over all the shapes rather than back to
    back: a burst of other work on the machine then spoils one timing of each of the shapes it
    overlaps (the median discards it) instead of every timing of one shape (which it cannot), and
    a slow drift of the machine's speed moves every shape's median alike."""
    runs: list[list[float]] = [[] for _ in shapes]
    for _ in range(repeats):
        for shape, times in zip(shapes, runs, strict=True):
            times.append(step(shape))
            if bar is not None:
                bar.update()
    return runs


def _sample(key: str, shape: list, runs: list[float]) -> dict:
    return {key: shape, "seconds": statistics.median(runs), "runs": runs}


def profile_engine(
    config: ClusterConfig,
    hardware: str = "cpu",
    *,
    repeats: int = DEFAULT_REPEATS,
    progress: bool = True,
    **grid: Any,
) -> Profile:
    """Measure (grid: measure's keyword arguments) and fit: the profile of the engine the config's
    workers run. The engine runs on one device, so the profile is for tp = pp = 1."""
    from cluster.instance import engine_config

    samples = measure(config, repeats=repeats, progress=progress, **grid)
    prefill, decode, errors = fit(samples)
    dtype = str(engine_config(config, "prefill").torch_dtype).removeprefix("torch.")
    return Profile(
        model=config.model.name,
        hardware=hardware,
        tp=1,
        pp=1,
        dtype=dtype,
        prefill=prefill,
        decode=decode,
        samples=samples,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fit_error=errors,
        contention=samples.get("contention", {}).get("factors", {}),
    )
