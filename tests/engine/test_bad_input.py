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


def test_bad_device_and_kv_memory_are_config_errors():
    with pytest.raises(InvalidConfigError, match="device 'gpu'"):
        EngineConfig(device="gpu")
    with pytest.raises(InvalidConfigError, match="device 'mps'"):
        EngineConfig(device="mps")
    with pytest.raises(InvalidConfigError, match="kv_cache_memory is a number of bytes"):
        EngineConfig(kv_cache_memory="1GB")


def test_stop_strings_need_a_tokenizer():
    engine = LLMEngine(EngineConfig(model="dummy:smollm2-135m", device="cpu", kv_cache_memory=4 << 20))
    with pytest.raises(TokenizerUnavailableError, match="stop_token_ids"):
        engine.add_request([1, 2, 3], SamplingParams(stop=("\n",)))
    assert not engine.has_unfinished_requests()


def test_gguf_rope_scaling_it_cannot_run_is_refused(embedded_gguf_path):
    from engine.loaders.gguf_loader import GGUFCheckpoint
    from engine.model_config import ModelConfig

    meta = dict(GGUFCheckpoint(embedded_gguf_path).metadata)
    meta["llama.rope.scaling.type"] = "yarn"
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        ModelConfig.from_gguf(meta, has_output_weight=False)


def test_duplicated_tensor_cannot_hide_a_missing_one(tiny_llama_dir):
    from safetensors.torch import load_file

    from engine.model_config import ModelConfig
    from engine.models.llama import LlamaForCausalLM

    weights = load_file(tiny_llama_dir / "model.safetensors")
    k_name = "model.layers.0.self_attn.k_proj.weight"
    q_name = "model.layers.0.self_attn.q_proj.weight"
    items = [(n, t) for n, t in weights.items() if n != k_name] + [(q_name, weights[q_name])]
    config = ModelConfig.from_hf(json.loads((tiny_llama_dir / "config.json").read_text()))
    with pytest.raises(CorruptCheckpointError, match="appears twice"):
        LlamaForCausalLM(config).load_weights(items)


@pytest.fixture(scope="module")
def padded_vocab_dir(tmp_path_factory):
    """A checkpoint whose embedding has 300 rows but whose tokenizer spells only 40 tokens (like
    Qwen2.5's padded vocabulary), plus a generation_config.json naming a second EOS id."""
    import tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("padded")
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    words = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(37)]]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()  # joins with spaces
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    return path


def test_padded_vocabulary_rows_are_never_prompted_or_sampled(padded_vocab_dir):
    engine = make_engine(str(padded_vocab_dir))
    assert engine.vocab_size == 40 and engine.model_config.vocab_size == 300
    assert engine.eos_token_ids == {2, 7}  # config.json's and generation_config.json's
    with pytest.raises(InvalidPromptError, match=r"outside the vocabulary \[0, 40\)"):
        engine.add_request([3, 250])
    # Random weights spread probability almost evenly over all 300 rows: unmasked, ~87% of draws
    # would land on ids the tokenizer cannot spell.
    from engine import LLM

    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=1)
    outs = LLM.from_engine(engine).generate([[3, 4, 5]] * 4, params)
    assert all(o.finish_reason == "length" for o in outs)
    assert all(0 <= t < 40 for o in outs for t in o.token_ids)


def test_request_failing_mid_generation_finishes_alone(embedded_loaded):
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_memory=64 << 20)
    engine = LLMEngine(config, loaded=embedded_loaded)
    free = engine.num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    doomed = engine.add_request("The capital of France is", params)
    healthy = engine.add_request("Once upon a time", params)

    def broken(token_id):
        raise RuntimeError("detokenizer exploded")

    engine._detok[doomed].add_token = broken
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    assert outs[doomed].finish_reason == "error" and "exploded" in str(outs[doomed].error)
    assert outs[healthy].finish_reason == "length" and len(outs[healthy].token_ids) == 6
    assert engine.num_free_blocks == free
    # The engine keeps serving: the same prompt again gives the same tokens.
    again = engine.add_request("Once upon a time", params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id == again and out.token_ids == outs[healthy].token_ids


def test_interrupted_generate_leaves_no_request_behind(embedded_llm, monkeypatch):
    engine = embedded_llm.engine
    free = engine.num_free_blocks
    calls = 0
    real_step = engine.step

    def step_then_interrupt():
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        embedded_llm.generate(["Hello", "Good morning"], SamplingParams(max_tokens=8, ignore_eos=True))
    assert not engine.has_unfinished_requests() and engine.num_free_blocks == free


def test_bad_conversation_in_a_chat_batch_fails_alone(embedded_llm):
    from engine.errors import InvalidChatMessagesError

    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    good = [{"role": "user", "content": "Hi"}]
    outs = embedded_llm.chat([good, [{"role": "user"}], good], params)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert isinstance(outs[1].error, InvalidChatMessagesError)
    assert outs[0].token_ids == outs[2].token_ids
    assert embedded_llm.chat([]) == [] and embedded_llm.generate([]) == []
