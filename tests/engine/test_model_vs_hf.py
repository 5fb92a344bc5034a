"""The engine against Hugging Face transformers on the embedded GGUF model (float32, CPU)."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy

from engine import SamplingParams
from engine.kv_cache import CacheConfig
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence

NEW_TOKENS = 32
RAW_PROMPTS = [
    "Hello",
    "The three primary colors are",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "In 1869 the Suez Canal opened, linking the Mediterranean Sea to the Red Sea. The canal shortened "
    "the sea route between Europe and South Asia by thousands of kilometres, and it quickly became one "
    "of the busiest waterways in the world. Its construction took ten years and employed tens of "
    "thousands of workers. Summarise the history of the canal in one sentence:",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "List three fruits."},
    ],
]


@pytest.fixture(scope="module")
def prompts(embedded_llm, hf_tokenizer) -> list[list[int]]:
    ids = []
    for text in RAW_PROMPTS:
        ours = embedded_llm.tokenizer.encode(text)
        assert ours == hf_tokenizer.encode(text, add_special_tokens=False)
        ids.append(ours)
    for chat in CHATS:
        ours = embedded_llm.chat_prompt_ids(chat)
        theirs = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert ours == hf_tokenizer.encode(theirs, add_special_tokens=False)
        ids.append(ours)
    assert len({len(p) for p in ids}) == len(ids), "prompts of different lengths"
    return ids


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_greedy_tokens_match_transformers(embedded_llm, hf_model, prompts):
    for ids in prompts:
        ours = embedded_llm.generate(ids, GREEDY, use_tqdm=False)[0].token_ids
        assert ours == hf_greedy(hf_model, ids, NEW_TOKENS), embedded_llm.tokenizer.decode(ids)


def test_mixed_batch_equals_one_at_a_time(embedded_llm, prompts):
    alone = [embedded_llm.generate(ids, GREEDY, use_tqdm=False)[0].token_ids for ids in prompts]
    batched = [o.token_ids for o in embedded_llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert batched == alone


def test_chunked_prefill_matches_whole_prefill(embedded_loaded):
    runner = ModelRunner(embedded_loaded.model, CacheConfig(memory_bytes=32 << 20), torch.device("cpu"))
    ids = list(range(100, 190))  # 90 tokens: 6 blocks, the chunk boundaries fall inside blocks

    def logits_in_chunks(sizes: list[int]) -> torch.Tensor:
        seq = Sequence("s", list(ids), len(ids), GREEDY, 0.0, block_table=list(range(6)))
        for n in sizes:
            logits = runner.compute_logits([ScheduledChunk(seq, n)])
            seq.num_computed_tokens += n
        return logits[0]

    whole = logits_in_chunks([90])
    for sizes in ([45, 45], [7, 33, 50], [1] * 10 + [80], [89, 1]):
        torch.testing.assert_close(logits_in_chunks(sizes), whole, atol=1e-4, rtol=1e-5)


def test_capital_of_france(embedded_llm):
    out = embedded_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
