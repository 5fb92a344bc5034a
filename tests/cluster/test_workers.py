"""A prefill worker and a decode worker in one process (their own loop threads, KV over shared
memory), driven the way the controller drives the actors: exact greedy tokens against the offline
engine, a first token that ends the request, cancellation on both sides, no block left behind."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster.config import config_from_dict
from cluster.instance import build_colocated, build_decode, build_prefill
from engine.model_loader import load_model
from engine.sampling_params import SamplingParams
from kv_transfer.resharding import KVDestination
from prefill_worker.worker import PrefillRequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def pair():
    config = config_from_dict(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
            "prefill": {"max_num_batched_tokens": 256, "chunk_size": 64, "kv_cache_memory": "64MiB"},
            "decode": {"max_batch": 8, "kv_cache_memory": "64MiB"},
            "kv_transfer": {"transport": "shm", "layerwise": True},
        }
    )
    # Engines stepping on their own threads need their own model copies.
    prefill = build_prefill(config, load_model("smollm2-135m", torch.float32, torch.device("cpu")))
    inbox = Inbox()
    decode, servers = build_decode(
        config, inbox, load_model("smollm2-135m", torch.float32, torch.device("cpu"))
    )
    prefill.start()
    decode.start_loop()
    yield prefill, decode, KVDestination("shm", (servers["shm"].address,)), inbox
    prefill.stop()
    decode.stop()
    for server in servers.values():
        server.close()


class Inbox:
    """The decode worker's one consumer: hands each step's chunks to their request's Stream."""

    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self.calls: list[set[str]] = []  # the requests each call carried

    def __call__(self, chunks) -> None:
        self.calls.append({chunk.request_id for chunk in chunks})
        for chunk in chunks:
            self.streams[chunk.request_id](chunk)

    def open(self, request_id: str) -> Stream:
        self.streams[request_id] = stream = Stream()
        return stream


class Stream:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.reason: str | None = None
        self.done = threading.Event()

    def __call__(self, chunk) -> None:
        self.tokens += chunk.token_ids
        self.text += chunk.text
        if chunk.finish_reason:
            self.reason = chunk.finish_reason
            self.done.set()


def run(pair, request_id: str, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
    prefill, decode, endpoint, inbox = pair
    decode.reserve(request_id, len(prompt)).result(10)
    result = prefill.submit(PrefillRequest(request_id, tuple(prompt), params, endpoint)).result(60)
    if result.finish_reason != "prefilled":
        decode.abort(request_id).result(10)
        return [result.first_token], result.text, result.finish_reason
    stream = inbox.open(request_id)
    decode.start(request_id, prompt, result.first_token, result.text, params).result(10)
    assert stream.done.wait(60)
    return [result.first_token, *stream.tokens], result.text + stream.text, stream.reason


def assert_idle(pair, within_s: float = 10.0) -> None:
    """Every block back on both sides, nothing held or running. On a parallel instance the blocks
    of a dropped transfer are freed once every other rank has answered the abort, which can come
    just after the request's result: so wait (boundedly) for the accounting to settle."""
    prefill, decode, _, _ = pair
    p_alloc, d_alloc = prefill.allocator, decode.allocator

    def held() -> tuple[int, int, int, int]:
        return (
            p_alloc.num_blocks - prefill.loop.submit(lambda: p_alloc.num_free_blocks).result(10),
            d_alloc.num_blocks - decode.loop.submit(lambda: d_alloc.num_free_blocks).result(10),
            prefill.sender.num_held_blocks,
            decode.receiver.num_reserved_blocks,
        )

    deadline = time.monotonic() + within_s
    while (now := held()) != (0, 0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert now == (0, 0, 0, 0), f"blocks still held (prefill, decode, sender, receiver): {now}"
    assert prefill.load().running == 0 and decode.load().running == 0


def test_workers_give_the_offline_engines_greedy_tokens_and_text(pair, embedded_llm):
    tok = embedded_llm.tokenizer
    prompts = [tok.encode("The history of the printing press"), tok.encode("Hi") * 40]  # one chunked
    expected = embedded_llm.generate(prompts, GREEDY, use_tqdm=False)
    outs = []
    threads = [
        threading.Thread(target=lambda i=i, p=p: outs.append((i, run(pair, f"w{i}", p, GREEDY))))
        for i, p in enumerate(prompts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (tokens, text, reason) in sorted(outs):
        assert tokens == expected[i].token_ids and text == expected[i].text and reason == "length"
    assert_idle(pair)


def test_a_first_token_that_is_the_last_needs_no_decode(pair):
    tokens, text, reason = run(pair, "one", [1, 504, 3458], SamplingParams(temperature=0.0, max_tokens=1))
    assert len(tokens) == 1 and reason == "length" and text
    assert_idle(pair)


def test_cancelling_frees_blocks_on_both_sides(pair):
    prefill, decode, endpoint, inbox = pair
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    prompt = [1, 504, 3458, 314]
    decode.reserve("c", len(prompt)).result(10)
    result = prefill.submit(PrefillRequest("c", tuple(prompt), params, endpoint)).result(60)
    stream = inbox.open("c")
    decode.start("c", prompt, result.first_token, result.text, params).result(10)
    decode.abort("c").result(10)
    assert stream.done.wait(10) and stream.reason == "abort"
    # A reservation whose prefill never comes, and a prefill cancelled before it ran.
    decode.reserve("never", 40).result(10)
    decode.abort("never").result(10)
    future = prefill.submit(PrefillRequest("gone", tuple(prompt * 50), params, endpoint))
    prefill.abort("gone")
    with pytest.raises(Exception, match="aborted|cancelled"):
        future.result(30)
    assert_idle(pair)


def test_one_emit_per_step_carries_every_running_request(pair):
    prefill, decode, endpoint, inbox = pair
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    streams = []
    for request_id, prompt in (("m1", [1, 504, 3458, 314]), ("m2", [1, 2, 3])):
        decode.reserve(request_id, len(prompt)).result(10)
        result = prefill.submit(PrefillRequest(request_id, tuple(prompt), params, endpoint)).result(60)
        streams.append(inbox.open(request_id))
        decode.start(request_id, prompt, result.first_token, result.text, params).result(10)
    while len(streams[1].tokens) < 3:
        assert not streams[1].done.wait(0.01)
    decode.abort("m1").result(10)
    decode.abort("m2").result(10)
    assert all(s.done.wait(10) and s.reason == "abort" for s in streams)
    assert {"m1", "m2"} in inbox.calls  # both requests' tokens of a step in one call
    assert_idle(pair)


@pytest.fixture(scope="module")
def colocated():
    config = config_from_dict(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
            "prefill": {"max_num_batched_tokens": 96, "chunk_size": 32},
            "decode": {"max_batch": 8, "kv_cache_memory": "64MiB"},
            "colocated": {"instances": 1},
        }
    )
    inbox = Inbox()
    worker = build_colocated(config, inbox, load_model("smollm2-135m", torch.float32, torch.device("cpu")))
    worker.start_loop()
    yield worker, inbox
    worker.stop()


def test_a_colocated_replica_streams_the_offline_engines_tokens_and_frees_everything(colocated, embedded_llm):
    """The colocated baseline: prompts go straight into the replica, which prefills them in chunks
    (chunk_size 32) between decode steps and streams every token, the first one included."""
    worker, inbox = colocated
    tok = embedded_llm.tokenizer
    prompts = [tok.encode("The history of the printing press"), tok.encode("Hi") * 40]
    expected = embedded_llm.generate(prompts, GREEDY, use_tqdm=False)
    streams = [inbox.open(f"col{i}") for i in range(len(prompts))]
    for i, prompt in enumerate(prompts):
        worker.submit(f"col{i}", prompt, GREEDY).result(10)
    for stream, want in zip(streams, expected, strict=True):
        assert stream.done.wait(60)
        assert stream.tokens == want.token_ids and stream.text == want.text and stream.reason == "length"

    # Bad input fails its own request only; a cancelled one frees its blocks.
    with pytest.raises(Exception, match="vocabulary|token"):
        worker.submit("bad", [10**7], GREEDY).result(10)
    long = inbox.open("long")
    worker.submit(
        "long", prompts[1], SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    ).result(10)
    while len(long.tokens) < 2:
        assert not long.done.wait(0.01)
    worker.abort("long").result(10)
    assert long.done.wait(10) and long.reason == "abort"
    alloc = worker.allocator
    assert worker.loop.submit(lambda: alloc.num_free_blocks).result(10) == alloc.num_blocks
    load = worker.load()
    assert (load.running, load.pending_tokens) == (0, 0)
    with pytest.raises(ValueError, match="colocated replica"):
        worker.reserve("x", 10)


def test_a_decode_worker_refuses_fresh_prompts(pair):
    _, decode, _, _ = pair
    with pytest.raises(ValueError, match="colocated replicas"):
        decode.submit("x", [1, 2, 3], GREEDY)
