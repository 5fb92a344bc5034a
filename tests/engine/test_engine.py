"""Engine behaviour on the embedded model: stopping, seeds, logprobs, preemption, aborts, no leaks."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def prompt_ids(embedded_llm) -> list[list[int]]:
    texts = ["Once upon a time", "The weather today is", "import numpy as np\n", "My favourite food is"]
    return [embedded_llm.tokenizer.encode(t) for t in texts]


def run_all(engine: LLMEngine, prompts, params) -> list:
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def test_max_tokens_and_length_finish(embedded_llm, prompt_ids):
    out = embedded_llm.generate(prompt_ids[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[
        0
    ]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_truncates_text(embedded_llm, prompt_ids):
    full = embedded_llm.generate(prompt_ids[0], GREEDY, use_tqdm=False)[0]
    words = full.text.split()
    stop = words[3]
    out = embedded_llm.generate(prompt_ids[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert len(out.token_ids) < len(full.token_ids)


def test_streamed_text_is_never_retracted_by_a_stop_string(embedded_llm, prompt_ids):
    full = embedded_llm.generate(prompt_ids[0], GREEDY, use_tqdm=False)[0]
    cut = len(full.text) // 2
    stop = full.text[cut : cut + 6]  # spans token boundaries, so it appears over several steps
    engine = embedded_llm.engine
    rid = engine.add_request(prompt_ids[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    shown: list[str] = []
    while engine.has_unfinished_requests():
        shown += [o.text for o in engine.step() if o.request_id == rid]
    final = full.text[: full.text.index(stop)]
    assert shown[-1] == final
    for before, after in zip(shown, shown[1:], strict=False):
        assert after.startswith(before), (before, after)  # each output extends the last one


def test_stop_token_ids(embedded_llm, prompt_ids):
    full = embedded_llm.generate(prompt_ids[1], GREEDY)[0]
    stop_token = full.token_ids[5]
    first = full.token_ids.index(stop_token)
    out = embedded_llm.generate(
        prompt_ids[1], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_token])
    )[0]
    assert out.token_ids == full.token_ids[: first + 1] and out.finish_reason == "stop"


def test_eos_stops_unless_ignored(embedded_llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    stopped = embedded_llm.chat(chat, SamplingParams(temperature=0, max_tokens=64))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == 2  # <|im_end|>
    ignored = embedded_llm.chat(
        chat, SamplingParams(temperature=0, max_tokens=len(stopped.token_ids) + 4, ignore_eos=True)
    )[0]
    assert ignored.finish_reason == "length"
    assert ignored.token_ids[: len(stopped.token_ids)] == stopped.token_ids


def test_seeded_sampling_is_reproducible_across_batches(embedded_llm, prompt_ids):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    alone = embedded_llm.generate(prompt_ids[2], seeded)[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = embedded_llm.generate([prompt_ids[0], prompt_ids[2], prompt_ids[1]], [other, seeded, other])
    assert mixed[1].token_ids == alone
    assert embedded_llm.generate(prompt_ids[2], seeded)[0].token_ids == alone
    different = embedded_llm.generate(
        prompt_ids[2], SamplingParams(temperature=0.9, max_tokens=16, seed=99, ignore_eos=True)
    )[0]
    assert different.token_ids != alone


def test_logprobs(embedded_llm, prompt_ids):
    out = embedded_llm.generate(
        prompt_ids[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    )[0]
    assert len(out.logprobs) == len(out.top_logprobs) == 4
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert top[0][0] == token and top[0][1] == pytest.approx(lp)  # greedy picks the most likely
        assert [t[1] for t in top] == sorted((t[1] for t in top), reverse=True) and lp <= 0


def test_preemption_under_tiny_cache_gives_same_tokens(embedded_loaded, embedded_llm, prompt_ids):
    expected = [o.token_ids for o in embedded_llm.generate(prompt_ids, GREEDY)]
    block = 2 * 30 * 3 * 64 * 4 * 16  # bytes of one 16-token block of this model in float32
    engine = LLMEngine(
        EngineConfig(
            kv_cache_memory=6 * block,
            max_num_batched_tokens=16,
            max_num_seqs=4,
            device="cpu",
            dtype="float32",
        ),
        loaded=embedded_loaded,
    )
    assert engine.scheduler.allocator.num_blocks == 6
    outs = run_all(engine, prompt_ids, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.num_free_blocks == 6


def test_chunked_prefill_engine_matches(embedded_loaded, embedded_llm, prompt_ids):
    long_prompt = sum(prompt_ids, []) * 3
    expected = embedded_llm.generate(long_prompt, GREEDY)[0].token_ids
    engine = LLMEngine(
        EngineConfig(
            max_num_batched_tokens=8, max_num_seqs=4, device="cpu", dtype="float32", kv_cache_memory=64 << 20
        ),
        loaded=embedded_loaded,
    )
    outs = run_all(engine, [long_prompt, prompt_ids[0]], GREEDY)
    assert outs[0].token_ids == expected
    assert engine.num_free_blocks == engine.scheduler.allocator.num_blocks


def test_abort_frees_blocks_and_others_finish(embedded_llm, prompt_ids):
    engine = embedded_llm.engine
    free_before = engine.num_free_blocks
    keep = engine.add_request(prompt_ids[0], GREEDY)
    drop = engine.add_request(prompt_ids[1], GREEDY)
    engine.step()
    engine.step()
    aborted = engine.abort_request(drop)
    assert aborted.finish_reason == "abort" and aborted.finished
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finished) == {keep} and len(finished[keep].token_ids) == GREEDY.max_tokens
    assert engine.num_free_blocks == free_before


def test_decode_batch_of_very_different_lengths_matches_each_alone(embedded_llm):
    """Short and long contexts decode in separate attention groups (rows gathered and scattered
    back); every request's greedy tokens equal its own run alone."""
    long = [(7 * i) % 40000 + 100 for i in range(700)]
    prompts = [list(range(300, 320)), long, list(range(900, 930)), long[:650]]
    runner = embedded_llm.engine.runner
    widths = [len(p) + 1 for p in prompts]
    groups = runner._decode_groups([list(range(-(-w // 16))) for w in widths], widths)
    assert len(groups) == 2 and groups[0].rows.tolist() == [0, 2]  # the batch below is split
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    together = embedded_llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, together, strict=True):
        assert out.token_ids == embedded_llm.generate(prompt, params, use_tqdm=False)[0].token_ids


def test_timeline_is_ordered(embedded_llm, prompt_ids):
    t = embedded_llm.generate(prompt_ids[0], GREEDY)[0].timeline
    assert t.arrival <= t.first_scheduled <= t.first_token <= t.finished and t.ttft >= 0
    # Queueing ends when the first step starts, so the prefill's own forward lies between the two.
    assert t.first_token - t.first_scheduled > 0


def test_dummy_model_runs_on_token_ids():
    engine = LLMEngine(EngineConfig(model="dummy:smollm2-135m", device="cpu", kv_cache_memory=16 << 20))
    outs = run_all(engine, [[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(outs[0].token_ids) == 3 and outs[0].text == ""
    assert engine.runner.kv_cache.dtype == torch.float32
