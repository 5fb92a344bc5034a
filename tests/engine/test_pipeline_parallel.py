"""Pipeline parallelism inside one engine: the stage plan, stage-by-stage loading, micro-batches,
and greedy outputs of real multi-process engines (gloo on the CPU; pipeline stages alone and
combined with tensor parallelism) against the single-process engine."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from engine import EngineConfig, SamplingParams
from engine.errors import InvalidConfigError
from engine.llm import LLM
from engine.model_loader import load_model
from engine.parallel.pipeline import PPStage, split_micro_batches
from engine.parallel.ranks import RankFailedError, RankPlace
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three prime numbers:",
]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SMALL = dict(device="cpu", dtype="float32", kv_cache_memory=64 << 20)


def test_stages_of_the_embedded_model(embedded_loaded):
    model = embedded_loaded.config  # 30 layers, tied embeddings
    first, second = PPStage(model, 0, 2), PPStage(model, 1, 2)
    assert (first.layers, second.layers) == (range(0, 15), range(15, 30))
    assert second.config.num_layers == 15
    assert second.rename("model.layers.17.mlp.down_proj.weight") == "model.layers.2.mlp.down_proj.weight"
    assert first.rename("model.layers.17.mlp.down_proj.weight") is None
    assert first.rename("model.norm.weight") is None and second.rename("model.norm.weight")
    # the embedding is the first stage's input and, tied, the last stage's LM head
    assert first.holds("model.embed_tokens.weight") and second.holds("model.embed_tokens.weight")
    assert not PPStage(model, 1, 3).holds("model.embed_tokens.weight")  # a middle stage
    with pytest.raises(InvalidConfigError, match="between 1 and the model's number of layers"):
        PPStage(model, 0, 31)
    assert [RankPlace(g, 2, 2).stage for g in range(4)] == [0, 0, 1, 1]
    assert [RankPlace(g, 2, 2).tp_rank for g in range(4)] == [0, 1, 0, 1]


def _chunks(sizes: list[int]) -> list[ScheduledChunk]:
    seqs = [Sequence(f"r{i}", list(range(n)), n, SamplingParams(), 0.0, None) for i, n in enumerate(sizes)]
    return [ScheduledChunk(s, n) for s, n in zip(seqs, sizes, strict=True)]


@pytest.mark.parametrize(
    ("sizes", "parts", "expected"),
    [
        ([1, 1, 1, 1], 2, [[1, 1], [1, 1]]),
        ([1, 1, 1, 500], 2, [[1, 1, 1], [500]]),
        ([300], 4, [[300]]),  # one chunk cannot be cut: one micro-batch
        ([1] * 7, 3, [[1, 1], [1, 1, 1], [1, 1]]),
        ([200, 200, 1, 1], 2, [[200], [200, 1, 1]]),
    ],
)
def test_micro_batches_are_contiguous_balanced_and_never_empty(sizes, parts, expected):
    chunks = _chunks(sizes)
    runs = split_micro_batches(chunks, parts)
    assert [c for run in runs for c in run] == chunks  # every chunk once, in order
    assert [[c.num_tokens for c in run] for run in runs] == expected


@pytest.mark.parametrize("model", ["smollm2-135m", "dummy:smollm2-135m"])
def test_a_stage_loads_exactly_its_layers(model):
    cpu = torch.device("cpu")
    whole = dict(load_model(model, torch.float32, cpu).model.named_parameters())
    first = dict(load_model(model, torch.float32, cpu, pp=(0, 2)).model.named_parameters())
    last = dict(load_model(model, torch.float32, cpu, pp=(1, 2)).model.named_parameters())
    for name in ("self_attn.qkv_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(first[f"model.layers.3.{name}"], whole[f"model.layers.3.{name}"])
        assert torch.equal(last[f"model.layers.3.{name}"], whole[f"model.layers.18.{name}"])
    assert not any(n.startswith("model.layers.15.") for n in first | last)
    assert "model.norm.weight" in last and "model.norm.weight" not in first
    assert torch.equal(last["model.embed_tokens.weight"], whole["model.embed_tokens.weight"])  # tied head
    # each stage holds about half of the decoder layers' parameters
    layers = sum(p.numel() for n, p in whole.items() if ".layers." in n)
    assert sum(p.numel() for n, p in first.items() if ".layers." in n) == layers // 2


@pytest.fixture(scope="module")
def pp_llm():
    with LLM("smollm2-135m", **SMALL, pipeline_parallel_size=2) as llm:
        yield llm


def test_pipeline_parallel_greedy_output_equals_the_single_process_engine(pp_llm, embedded_llm):
    pp = pp_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    single = embedded_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in pp] == [o.token_ids for o in single]
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in pp)
    assert pp_llm.engine.runner.kv_cache.shape[0] == 15  # rank 0's cache: its stage's layers only


def test_pipeline_parallel_chunked_prefill_and_batching_match(pp_llm, embedded_llm):
    """Long prompts cut into chunks, mixed with decodes: several micro-batches per step."""
    long = [" ".join(["word"] * n) + " and then" for n in (150, 40, 300, 7)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    pp = pp_llm.generate(long, params, use_tqdm=False)
    single = embedded_llm.generate(long, params, use_tqdm=False)
    assert [o.token_ids for o in pp] == [o.token_ids for o in single]


def test_pipeline_logits_at_every_token_match(pp_llm, embedded_llm):
    """The perplexity path (logits at every row) through the stages."""
    ids = embedded_llm.engine.tokenize(PROMPTS[2])

    def all_logits(engine):
        seq = Sequence("ppl", ids, len(ids), SamplingParams(), 0.0, None)
        seq.block_table = engine.scheduler.allocator.allocate(len(ids) // engine.scheduler.block_size + 1)
        try:
            return engine.runner.compute_all_logits([ScheduledChunk(seq, len(ids))])
        finally:
            engine.scheduler.allocator.free(seq.block_table)

    ours, theirs = all_logits(pp_llm.engine), all_logits(embedded_llm.engine)
    assert ours.shape == (len(ids), embedded_llm.engine.model_config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="layer-wise hooks need every layer in this process"):
        pp_llm.engine.runner.compute_logits([], on_layer_stored=lambda layer: None)


def test_tensor_and_pipeline_parallel_together_match(embedded_llm):
    """TP=2 x PP=2: four ranks, the stages' TP groups apart from the pipeline's hand-offs."""
    with LLM("smollm2-135m", **SMALL, tensor_parallel_size=2, pipeline_parallel_size=2) as llm:
        assert len(llm.engine.ranks.processes) == 3
        both = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        single = embedded_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.token_ids for o in both] == [o.token_ids for o in single]
        # rank 0: stage 0's layers, TP rank 0's 2 of the 3 KV heads
        assert tuple(llm.engine.runner.kv_cache.shape[i] for i in (0, -2)) == (15, 2)


def test_degrees_the_model_cannot_take_are_refused_by_name():
    with pytest.raises(InvalidConfigError, match="pipeline_parallel_size must be an integer >= 1"):
        EngineConfig(pipeline_parallel_size=0)
    with pytest.raises(InvalidConfigError, match="pipeline_parallel_size 40 must be between 1"):
        LLM("smollm2-135m", **SMALL, pipeline_parallel_size=40)


def test_a_dead_stage_fails_the_engine_with_a_clear_error():
    with LLM("smollm2-135m", **SMALL, pipeline_parallel_size=2) as llm:
        assert llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids
        (rank,) = llm.engine.ranks.processes
        os.kill(rank.pid, signal.SIGKILL)
        rank.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(RankFailedError, match="rank process pdserve-rank1 is not running"):
            llm.generate("Hello again", SamplingParams(max_tokens=2), use_tqdm=False)
        assert time.monotonic() - start < 30
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.num_free_blocks == llm.engine.scheduler.allocator.num_blocks
