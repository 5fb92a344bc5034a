"""Bad input gets a specific error that says what to fix, and nothing else breaks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import (
    CorruptCheckpointError,
    InsufficientMemoryError,
    InvalidConfigError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    ModelNotFoundError,
    PromptTooLongError,
    TokenizerUnavailableError,
    UnsupportedModelError,
)
from engine.model_loader import load_model

CPU = dict(device="cpu", dtype="float32", kv_cache_memory=8 << 20)


def make_engine(model: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, **CPU))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        make_engine(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        make_engine(str(tmp_path))  # an empty directory
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        make_engine(str(tmp_path / "weights.bin"))


def test_unknown_dummy_preset():
    with pytest.raises(ModelNotFoundError, match="llama-3.1-8b"):
        make_engine("dummy:gpt-5")


def test_unsupported_architecture(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        make_engine(str(tmp_path / "m"))


def test_unsupported_rope_scaling(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        make_engine(str(tmp_path / "m"))


def test_corrupt_safetensors(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        make_engine(str(tmp_path / "m"))


def test_checkpoint_not_matching_config(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptCheckpointError, match="shape"):
        make_engine(str(tmp_path / "m"))


def test_corrupt_config_json(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        make_engine(str(tmp_path / "m"))


@pytest.mark.parametrize("cut", [3, 1000, 2_000_000, -1000])
def test_corrupt_gguf(embedded_gguf_path, tmp_path, cut):
    data = embedded_gguf_path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(CorruptCheckpointError, match="bad.gguf"):
        load_model(str(bad), torch.float32, torch.device("cpu"))


def test_gguf_with_wrong_magic(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(CorruptCheckpointError, match="magic"):
        load_model(str(bad), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(InvalidSamplingParamsError, match=field):
        SamplingParams(**kwargs)


def test_unknown_sampling_key():
    with pytest.raises(InvalidSamplingParamsError, match="temperature"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_prompt_errors_leave_engine_serving(embedded_llm):
    engine = embedded_llm.engine
    free = engine.num_free_blocks
    with pytest.raises(PromptTooLongError, match="context"):
        engine.add_request([5] * engine.max_model_len)
    with pytest.raises(InvalidPromptError, match="vocabulary"):
        engine.add_request([5, 49152])
    with pytest.raises(InvalidPromptError, match="empty"):
        engine.add_request([])
    with pytest.raises(InvalidPromptError, match="empty"):
        engine.add_request("")
    with pytest.raises(InvalidPromptError, match="string or a list"):
        engine.add_request(3.5)
    assert not engine.has_unfinished_requests() and engine.num_free_blocks == free
    out = embedded_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3


def test_prompt_longer_than_kv_capacity(embedded_loaded):
    block = 2 * 30 * 3 * 64 * 4 * 16
    engine = LLMEngine(
        EngineConfig(device="cpu", dtype="float32", kv_cache_memory=2 * block), loaded=embedded_loaded
    )
    with pytest.raises(PromptTooLongError, match="KV cache holds 32"):
        engine.add_request(list(range(100, 140)))


def test_bad_request_in_batch_fails_alone(embedded_llm):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    too_long = [7] * embedded_llm.engine.max_model_len
    outs = embedded_llm.generate(["Hello there", too_long, [1, 10**9], "Good morning"], params)
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "length"]
    assert isinstance(outs[1].error, PromptTooLongError) and isinstance(outs[2].error, InvalidPromptError)
    assert len(outs[0].token_ids) == len(outs[3].token_ids) == 4
    alone = embedded_llm.generate("Good morning", params)[0]
    assert alone.token_ids == outs[3].token_ids
    with pytest.raises(PromptTooLongError):
        embedded_llm.generate(too_long, params)  # a single prompt raises


def test_model_too_big_for_memory_is_refused_before_allocating():
    with pytest.raises(InsufficientMemoryError, match="GiB for its weights"):
        make_engine("dummy:llama-3.1-70b")  # 280 GiB in float32


def test_kv_budget_smaller_than_a_block():
    with pytest.raises(InsufficientMemoryError, match="holds no block"):
        LLMEngine(EngineConfig(model="dummy:smollm2-135m", device="cpu", kv_cache_memory=1024))


def test_text_prompt_without_tokenizer():
    engine = LLMEngine(EngineConfig(model="dummy:smollm2-135m", device="cpu", kv_cache_memory=4 << 20))
    with pytest.raises(TokenizerUnavailableError, match="token ids"):
        engine.add_request("hello")


def test_bad_engine_config():
    with pytest.raises(InvalidConfigError, match="dtype"):
        EngineConfig(dtype="float8")
    with pytest.raises(InvalidConfigError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=8)
    with pytest.raises(InvalidConfigError, match="block_size"):
        EngineConfig(block_size=12)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidConfigError, match="no CUDA"):
            EngineConfig(device="cuda:0").torch_device  # noqa: B018
