"""Half-precision engines on the CPU agree with float32 on the embedded model."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine
from engine.block_manager import blocks_needed
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence


def last_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    seq = Sequence("x", list(ids), len(ids), SamplingParams(), 0.0)
    seq.block_table = engine.scheduler.allocator.allocate(blocks_needed(len(ids), engine.config.block_size))
    try:
        return engine.runner.compute_logits([ScheduledChunk(seq, len(ids))])[0]
    finally:
        engine.scheduler.allocator.free(seq.block_table)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(embedded_llm, dtype):
    ids = embedded_llm.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    reference = last_logits(embedded_llm.engine, ids)
    engine = LLMEngine(EngineConfig(device="cpu", dtype=dtype, kv_cache_memory=8 << 20))
    assert engine.runner.kv_cache.dtype == getattr(torch, dtype)
    logits = last_logits(engine, ids)
    assert logits.dtype == torch.float32  # logits are always handed to the sampler in float32
    assert int(logits.argmax()) == int(reference.argmax())
    top = reference.topk(5).indices
    assert (logits[top] - reference[top]).abs().max() < 0.05 * reference[top].abs().max()
