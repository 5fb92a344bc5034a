"""Tensor parallelism inside one engine: the shard plan, shard-by-shard loading, and greedy outputs
of real multi-process engines (gloo on the CPU) against the single-process engine."""

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
from engine.parallel.ranks import RankFailedError
from engine.parallel.tensor_parallel import TPShard, split_range

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three prime numbers:",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(("total", "parts"), [(3, 2), (9, 2), (1536, 2), (3, 3), (10, 4), (7, 7)])
def test_split_range_covers_everything_in_order_evenly(total, parts):
    ranges = [split_range(total, parts, i) for i in range(parts)]
    assert [i for r in ranges for i in r] == list(range(total))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_shards_of_the_embedded_model_over_two_ranks(embedded_loaded):
    model = embedded_loaded.config  # 9 query heads, 3 KV heads, head_dim 64, MLP 1536
    first, second = TPShard(model, 0, 2), TPShard(model, 1, 2)
    assert (first.kv_heads, first.q_heads, first.ffn) == (range(0, 2), range(0, 6), range(0, 768))
    assert (second.kv_heads, second.q_heads, second.ffn) == (range(2, 3), range(6, 9), range(768, 1536))
    assert (second.config.num_heads, second.config.num_kv_heads) == (3, 1)
    assert second.largest.num_kv_heads == 2  # every rank sizes its cache by rank 0's heads


def test_degrees_beyond_the_kv_heads_are_refused_by_name(embedded_loaded):
    with pytest.raises(InvalidConfigError, match="between 1 and the model's number of KV heads"):
        TPShard(embedded_loaded.config, 0, 4)
    with pytest.raises(InvalidConfigError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(tensor_parallel_size=0)


@pytest.mark.parametrize("model", ["smollm2-135m", "dummy:smollm2-135m"])
def test_a_rank_loads_exactly_its_slice_of_every_tensor(model):
    cpu = torch.device("cpu")
    whole = dict(load_model(model, torch.float32, cpu).model.named_parameters())
    part = load_model(model, torch.float32, cpu, tp=(1, 2))
    shard = TPShard(part.config, 1, 2)
    d = part.config.head_dim
    q, kv = shard.q_heads, shard.kv_heads
    qkv = whole["model.layers.3.self_attn.qkv_proj.weight"]
    k0, v0 = part.config.q_size, part.config.q_size + part.config.kv_size
    expected = torch.cat(
        [
            qkv[q.start * d : q.stop * d],
            qkv[k0 + kv.start * d : k0 + kv.stop * d],
            qkv[v0 + kv.start * d : v0 + kv.stop * d],
        ]
    )
    params = dict(part.model.named_parameters())
    assert torch.equal(params["model.layers.3.self_attn.qkv_proj.weight"], expected)
    o = whole["model.layers.3.self_attn.o_proj.weight"][:, q.start * d : q.stop * d]
    assert torch.equal(params["model.layers.3.self_attn.o_proj.weight"], o)
    f, i = shard.ffn, part.config.intermediate_size
    gate_up = whole["model.layers.3.mlp.gate_up_proj.weight"]
    assert torch.equal(
        params["model.layers.3.mlp.gate_up_proj.weight"],
        torch.cat([gate_up[f.start : f.stop], gate_up[i + f.start : i + f.stop]]),
    )
    assert torch.equal(
        params["model.layers.3.mlp.down_proj.weight"],
        whole["model.layers.3.mlp.down_proj.weight"][:, f.start : f.stop],
    )
    assert torch.equal(params["model.embed_tokens.weight"], whole["model.embed_tokens.weight"])
    # what the rank holds of the decoder layers: its share, not the whole
    layer = sum(p.numel() for n, p in params.items() if ".layers." in n)
    assert layer < 0.6 * sum(p.numel() for n, p in whole.items() if ".layers." in n)


@pytest.fixture(scope="module")
def tp_llm():
    config = dict(device="cpu", dtype="float32", kv_cache_memory=128 << 20, tensor_parallel_size=2)
    with LLM("smollm2-135m", **config) as llm:
        yield llm


def test_tensor_parallel_greedy_output_equals_the_single_process_engine(tp_llm, embedded_llm):
    tp = tp_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    single = embedded_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in tp] == [o.token_ids for o in single]
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in tp)
    # ranks 1 .. N-1 hold the same number of blocks as rank 0, whose cache holds only its 2 KV heads
    assert tp_llm.engine.runner.kv_cache.shape[-2] == 2


def test_tensor_parallel_chunked_prefill_and_batching_match(tp_llm, embedded_llm):
    """Long prompts cut into chunks, mixed with decodes, under the same scheduler settings."""
    long = [" ".join(["word"] * n) + " and then" for n in (150, 40, 300)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tp = tp_llm.generate(long, params, use_tqdm=False)
    single = embedded_llm.generate(long, params, use_tqdm=False)
    assert [o.token_ids for o in tp] == [o.token_ids for o in single]


def test_a_dead_rank_fails_the_engine_with_a_clear_error():
    with LLM(
        "smollm2-135m", device="cpu", dtype="float32", kv_cache_memory=64 << 20, tensor_parallel_size=2
    ) as llm:
        assert llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids
        (rank,) = llm.engine.ranks.processes
        os.kill(rank.pid, signal.SIGKILL)
        rank.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(RankFailedError, match="rank process pdserve-rank1 is not running"):
            llm.generate("Hello again", SamplingParams(max_tokens=2), use_tqdm=False)
        assert time.monotonic() - start < 30  # failed at once, not after the collective timeout
        assert not llm.engine.has_unfinished_requests()  # the request was aborted, its blocks freed
        assert llm.engine.num_free_blocks == llm.engine.scheduler.allocator.num_blocks
