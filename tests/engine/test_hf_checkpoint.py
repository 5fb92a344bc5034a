"""Hugging Face safetensors directories written by transformers load and match its logits."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.block_manager import blocks_needed
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
CASES = {
    "llama3.1-rope-scaling": (
        LlamaForCausalLM,
        LlamaConfig(
            **TINY,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        {},
    ),
    "llama2-sharded": (LlamaForCausalLM, LlamaConfig(**TINY), {"max_shard_size": "100KB"}),
    "qwen2-bias-tied": (Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=True), {}),
    "mistral": (MistralForCausalLM, MistralConfig(**TINY, sliding_window=None), {}),
}
PROMPTS = [[5, 17, 33, 2, 99], list(range(40, 140)), [7] * 3 + list(range(200, 260))]


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    cls, config, save_args = CASES[request.param]
    torch.manual_seed(0)
    model = cls(config).eval()
    if request.param.startswith("qwen2"):  # random biases, so a dropped bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, **save_args)
    return request.param, path, model


@pytest.mark.parametrize("onednn_linear", [True, False])
def test_loads_and_matches_transformers_logits(checkpoint, onednn_linear):
    name, path, hf = checkpoint
    if name == "llama2-sharded":
        assert (path / "model.safetensors.index.json").is_file()
    config = EngineConfig(
        model=str(path), device="cpu", dtype="float32", kv_cache_memory=4 << 20, onednn_linear=onednn_linear
    )
    engine = LLMEngine(config)
    assert engine.tokenizer is None
    for ids in PROMPTS:
        seq = Sequence("x", list(ids), len(ids), SamplingParams(), 0.0)
        allocator = engine.scheduler.allocator
        seq.block_table = allocator.allocate(blocks_needed(len(ids), engine.config.block_size))
        ours = engine.runner.compute_logits([ScheduledChunk(seq, len(ids))])[0]
        allocator.free(seq.block_table)
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_generates_same_greedy_tokens(checkpoint):
    _, path, hf = checkpoint
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", kv_cache_memory=4 << 20))
    rid = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.request_id == rid), out)
    assert out.token_ids == hf_greedy(hf, PROMPTS[0], 12)
