"""How long one engine step takes: the interface the simulator calls once per step, and the
roofline model that answers it for hardware we have never run on. (`placement/profiler.py`'s
fitted `Profile` answers the same two calls from measurements and replaces the roofline when a
profile of that hardware exists.)

    prefill_time(chunks)                chunks: (new tokens, tokens already cached) per sequence
    decode_time(num_seqs, num_context)  one token for each of `num_seqs` sequences whose context
                                        lengths (cached tokens plus the new one) sum to `num_context`
    slowdown(phase, other)              how much longer a `phase` step ("prefill" or "decode")
                                        takes while another instance on the same machine runs an
                                        `other` step: 1 where instances share nothing (one GPU
                                        each); measured by `pdserve profile` on a CPU, where
                                        instances share the memory bandwidth

Roofline: every operation takes max(FLOPs / (peak * compute efficiency), bytes / (bandwidth *
memory efficiency)); a layer is its projections (weights read once per step), attention (KV read
per sequence) and, with tensor parallelism, two ring all-reduces of the activations over the
node's link. Pipeline parallelism splits the layers into `pp` stages with a hop between stages:
for prefill, `prefill_time` is one batch's latency through all stages while the instance can take
the next batch after 1/pp of it; for decode, the batch is cut into `pp` micro-batches
that keep every stage busy, so one step of the whole batch takes `decode_time`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from engine.model_config import ModelConfig
from placement.errors import PlacementError
from placement.hardware import GPUSpec

# Fractions of peak that served LLM kernels reach: large GEMMs run at 60-75% of peak tensor-core
# FLOP/s, and bandwidth-bound decode kernels at 70-85% of peak HBM bandwidth (FlashInfer reports
# close to 100% for long sequences, flash-decoding 50-60%).
COMPUTE_EFFICIENCY = 0.65
MEMORY_EFFICIENCY = 0.8
# Per step: scheduling, input preparation, kernel launches and sampling on the host.
STEP_OVERHEAD_S = 2e-3
PHASES = ("prefill", "decode")  # what `slowdown` takes: a step with prompt work, or decodes only


class LatencyModel(Protocol):
    pp: int

    def prefill_time(self, chunks: Sequence[tuple[int, int]]) -> float: ...

    def decode_time(self, num_seqs: int, num_context: int) -> float: ...

    def slowdown(self, phase: str, other: str) -> float: ...


@dataclass(frozen=True)
class FixedLatency:
    """Every step takes `seconds`, whatever its batch: deterministic service, for checking the
    simulator against queueing theory."""

    seconds: float
    pp: int = 1

    def prefill_time(self, chunks: Sequence[tuple[int, int]]) -> float:
        return self.seconds

    def decode_time(self, num_seqs: int, num_context: int) -> float:
        return self.seconds

    def slowdown(self, phase: str, other: str) -> float:
        return 1.0


@dataclass(frozen=True)
class Roofline:
    model: ModelConfig
    gpu: GPUSpec
    tp: int = 1
    pp: int = 1
    step_overhead: float = STEP_OVERHEAD_S

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise PlacementError(f"tensor and pipeline parallel must be >= 1, got tp={self.tp} pp={self.pp}")
        if (
            self.model.num_heads % self.tp
            or self.model.num_kv_heads % self.tp
            and self.tp % self.model.num_kv_heads
        ):
            raise PlacementError(
                f"tp={self.tp} does not divide {self.model.name or 'the model'}'s attention heads "
                f"({self.model.num_heads} query, {self.model.num_kv_heads} KV)"
            )
        if self.pp > self.model.num_layers:
            raise PlacementError(
                f"pp={self.pp} is more stages than the model's {self.model.num_layers} layers"
            )

    # --- per-device constants ------------------------------------------------------------------

    @cached_property
    def _flops_rate(self) -> float:
        return self.gpu.peak_flops * COMPUTE_EFFICIENCY

    @cached_property
    def _byte_rate(self) -> float:
        return self.gpu.memory_bandwidth * MEMORY_EFFICIENCY

    @cached_property
    def _layer_params(self) -> int:
        m = self.model
        return (
            m.hidden_size * (m.q_size + 2 * m.kv_size)
            + m.q_size * m.hidden_size
            + 3 * m.hidden_size * m.intermediate_size
        )

    @cached_property
    def _kv_bytes_per_token_layer(self) -> float:
        """K and V of one token in one layer on one device (KV heads are split over tp, or
        replicated when there are fewer KV heads than devices)."""
        heads = max(1, self.model.num_kv_heads // self.tp)
        return 2 * heads * self.model.head_dim * self.gpu.dtype_bytes

    @cached_property
    def _attn_flops_per_pair(self) -> float:
        """FLOPs of one (query token, cached token) pair in one layer on one device: QK and PV."""
        return 4 * self.model.q_size / self.tp

    def _projections(self, num_tokens: float) -> float:
        b = self.gpu.dtype_bytes
        params = self._layer_params / self.tp
        return max(2 * num_tokens * params / self._flops_rate, params * b / self._byte_rate)

    def _attention(self, attn_flops: float, kv_bytes: float) -> float:
        return max(attn_flops / self._flops_rate, kv_bytes / self._byte_rate)

    def _all_reduce(self, num_tokens: int) -> float:
        if self.tp == 1:
            return 0.0
        size = num_tokens * self.model.hidden_size * self.gpu.dtype_bytes
        steps = 2 * (self.tp - 1)
        return steps * self.gpu.link_latency + steps / self.tp * size / self.gpu.link_bandwidth

    def _lm_head(self, num_rows: int) -> float:
        params = self.model.vocab_size * self.model.hidden_size / self.tp
        b = self.gpu.dtype_bytes
        return max(2 * num_rows * params / self._flops_rate, params * b / self._byte_rate)

    def _hops(self, num_tokens: int) -> float:
        size = num_tokens * self.model.hidden_size * self.gpu.dtype_bytes
        return (self.pp - 1) * (self.gpu.link_latency + size / self.gpu.link_bandwidth)

    @cached_property
    def _layers_per_stage(self) -> int:
        return math.ceil(self.model.num_layers / self.pp)

    # What a step's time takes from its number of tokens alone (one layer's projections and
    # all-reduces, the stage hops; for decode also the micro-batch split and the LM head), by that
    # number: the simulator asks about the same few hundred sizes millions of times.

    @cached_property
    def _prefill_parts(self) -> dict[int, tuple[float, float, float]]:
        return {}

    @cached_property
    def _decode_parts(self) -> dict[int, tuple[int, float, float, float, float]]:
        return {}

    # --- LatencyModel --------------------------------------------------------------------------

    def prefill_time(self, chunks: Sequence[tuple[int, int]]) -> float:
        """One prefill batch through every stage."""
        num_tokens = sum(new for new, _ in chunks)
        pairs = sum(new * (past + (new + 1) / 2) for new, past in chunks)
        kv = sum(past + new for new, past in chunks) * self._kv_bytes_per_token_layer
        parts = self._prefill_parts.get(num_tokens)
        if parts is None:
            parts = (self._projections(num_tokens), 2 * self._all_reduce(num_tokens), self._hops(num_tokens))
            self._prefill_parts[num_tokens] = parts
        projections, all_reduces, hops = parts
        layer = projections + self._attention(pairs * self._attn_flops_per_pair, kv) + all_reduces
        layers = self.model.num_layers * layer
        return self.step_overhead + layers + self._lm_head(len(chunks)) + hops

    def decode_time(self, num_seqs: int, num_context: int) -> float:
        """One token for every sequence: `pp` micro-batches (as even as the batch allows), each
        through every stage, so each stage runs its layers once per micro-batch."""
        if num_seqs == 0:
            return self.step_overhead
        parts = self._decode_parts.get(num_seqs)
        if parts is None:
            groups = min(self.pp, num_seqs)
            size = num_seqs / groups
            parts = (groups, self._projections(size), 2 * self._all_reduce(size))
            parts += (self._lm_head(num_seqs), self._hops(num_seqs))
            self._decode_parts[num_seqs] = parts
        groups, projections, all_reduces, lm_head, hops = parts
        context = num_context / groups
        attention = self._attention(
            context * self._attn_flops_per_pair, context * self._kv_bytes_per_token_layer
        )
        layers = groups * self._layers_per_stage * (projections + attention + all_reduces)
        return self.step_overhead + layers + lm_head + hops

    def slowdown(self, phase: str, other: str) -> float:
        """Instances on GPUs own their devices' memory: no slowdown from each other."""
        return 1.0

    # --- memory --------------------------------------------------------------------------------

    def weight_bytes_per_device(self) -> float:
        """Weights one device holds: its stage's layers split over tp, plus the embeddings."""
        m = self.model
        embed = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2) / self.tp
        return (self._layers_per_stage * self._layer_params / self.tp + embed) * self.gpu.dtype_bytes

    def kv_bytes_per_token_device(self) -> float:
        return self._layers_per_stage * self._kv_bytes_per_token_layer
