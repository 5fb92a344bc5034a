"""A GGUF written the way llama.cpp's converter writes one (Q/K rows permuted, Llama 3.1 scaling as a
`rope_freqs` tensor) loads and matches transformers on the source model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import LlamaConfig, LlamaForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.block_manager import blocks_needed
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}  # fmt: skip
CFG = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=512, rope_theta=5e5, rms_norm_eps=1e-6)  # fmt: skip


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(head_dim: int) -> np.ndarray:
    """Per-frequency divisors as llama.cpp's converter computes them for Llama 3.1."""
    freqs = 1.0 / (CFG["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim))
    old, lo, hi, factor = ROPE["original_max_position_embeddings"], 1.0, 4.0, ROPE["factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.fixture(scope="module")
def gguf_and_reference(tmp_path_factory):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CFG, rope_scaling=ROPE)).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama31.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(CFG["num_hidden_layers"])
    writer.add_context_length(CFG["max_position_embeddings"])
    writer.add_embedding_length(CFG["hidden_size"])
    writer.add_feed_forward_length(CFG["intermediate_size"])
    writer.add_head_count(CFG["num_attention_heads"])
    writer.add_head_count_kv(CFG["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(CFG["rms_norm_eps"])
    writer.add_rope_freq_base(CFG["rope_theta"])
    writer.add_vocab_size(CFG["vocab_size"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    sd = {k: v.numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd.pop("model.embed_tokens.weight"))
    writer.add_tensor("output_norm.weight", sd.pop("model.norm.weight"))
    writer.add_tensor("output.weight", sd.pop("lm_head.weight"))
    writer.add_tensor(
        "rope_freqs.weight", llama_cpp_rope_factors(CFG["hidden_size"] // CFG["num_attention_heads"])
    )
    for key, value in sd.items():
        _, _, layer, *rest = key.split(".")
        module = ".".join(rest[:-1])
        if module == "self_attn.q_proj":
            value = llama_cpp_permute(value, CFG["num_attention_heads"])
        elif module == "self_attn.k_proj":
            value = llama_cpp_permute(value, CFG["num_key_value_heads"])
        writer.add_tensor(f"blk.{layer}.{names[module]}.{rest[-1]}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, hf


def test_gguf_matches_transformers_with_llama31_rope(gguf_and_reference):
    path, hf = gguf_and_reference
    with pytest.warns(UserWarning, match="token ids only"):
        engine = LLMEngine(
            EngineConfig(model=str(path), device="cpu", dtype="float32", kv_cache_memory=4 << 20)
        )
    assert engine.model_config.rope_freq_factors is not None and engine.tokenizer is None
    ids = list(range(3, 203))  # 200 positions: beyond the 64-token original context, where scaling matters
    seq = Sequence("x", ids, len(ids), SamplingParams(), 0.0)
    seq.block_table = engine.scheduler.allocator.allocate(blocks_needed(len(ids), engine.config.block_size))
    ours = engine.runner.compute_logits([ScheduledChunk(seq, len(ids))])[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
