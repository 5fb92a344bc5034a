"""A tensor-parallel prefill instance feeding a pipeline-parallel decode instance, and the other way
round, in one process (the workers' rank 0s) plus their spawned ranks, KV over shared memory:
every prefill rank sends the layers and KV heads it holds straight to the decode ranks that own
them. Greedy tokens equal the single-process offline engine's, and no block is left behind on
any rank after requests finish, are cancelled, or lose their KV."""

from __future__ import annotations

import pytest
from test_workers import GREEDY, Inbox, assert_idle, run

from cluster.config import config_from_dict
from cluster.instance import build_decode, build_prefill, kv_endpoints
from engine.sampling_params import SamplingParams
from kv_transfer.errors import TransferError
from kv_transfer.resharding import KVDestination
from prefill_worker.worker import PrefillRequest

LAYOUTS = {
    "prefill tp=2, decode pp=2": ({"tp": 2}, {"pp": 2}),
    "prefill pp=2, decode tp=2": ({"pp": 2}, {"tp": 2}),  # KV heads split 2 + 1
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request):
    prefill_pool, decode_pool = LAYOUTS[request.param]
    config = config_from_dict(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
            "prefill": {
                "max_num_batched_tokens": 256,
                "chunk_size": 64,
                "kv_cache_memory": "64MiB",
                **prefill_pool,
            },
            "decode": {"max_batch": 8, "kv_cache_memory": "64MiB", **decode_pool},
            "kv_transfer": {"transport": "shm"},
        }
    )
    prefill = build_prefill(config)
    inbox = Inbox()
    decode, servers = build_decode(config, inbox)
    prefill.start()
    decode.start_loop()
    ((kind, addresses),) = kv_endpoints(decode, servers)
    destination = KVDestination(kind, addresses, config.decode.tp, config.decode.pp)
    yield prefill, decode, destination, inbox
    prefill.stop()
    decode.stop()
    prefill.engine.close()
    decode.engine.close()
    for server in servers.values():
        server.close()


def test_each_decode_rank_serves_its_own_kv_endpoint(pair):
    prefill, decode, destination, _ = pair
    assert len(destination.addresses) == destination.tp * destination.pp == decode.engine.ranks.size
    assert len(set(destination.addresses)) == len(destination.addresses)  # one server per rank
    # tensor parallel: every rank sends layer by layer from its forward; with stages, after the step
    assert prefill.layerwise == (prefill.engine.config.pipeline_parallel_size == 1)


def test_resharded_kv_gives_the_offline_engines_greedy_tokens(pair, embedded_llm):
    tok = embedded_llm.tokenizer
    prompts = [tok.encode("The history of the printing press"), tok.encode("Hi") * 40]  # one chunked
    expected = embedded_llm.generate(prompts, GREEDY, use_tqdm=False)
    for i, prompt in enumerate(prompts):
        tokens, text, reason = run(pair, f"p{i}", prompt, GREEDY)
        assert tokens == expected[i].token_ids and text == expected[i].text and reason == "length"
    assert_idle(pair)
    prefill = pair[0]
    counts = prefill.engine.ranks.services.call(1, "counts").result(10)
    how = "layer by layer" if prefill.layerwise else "whole"
    assert counts[how] >= len(prompts) and sum(counts.values()) == counts[how]


def test_kv_that_never_arrived_fails_the_request_and_frees_every_rank(pair):
    prefill, decode, destination, _ = pair
    prompt = [1, 504, 3458, 314]
    decode.reserve("lost", len(prompt)).result(10)
    with pytest.raises(TransferError, match="not complete"):  # start without the prefill
        decode.start("lost", prompt, 42, "", GREEDY).result(10)
    decode.reserve("never", 40).result(10)
    decode.abort("never").result(10)
    future = prefill.submit(PrefillRequest("gone", tuple(prompt * 50), GREEDY, destination))
    prefill.abort("gone")
    with pytest.raises(Exception, match="aborted|cancelled"):
        future.result(30)
    assert_idle(pair)
    # every decode rank let go of both reservations: they can be made again
    decode.reserve("lost", len(prompt)).result(10)
    decode.abort("lost").result(10)
    assert_idle(pair)


def test_a_request_ending_with_its_first_token_frees_every_rank(pair):
    tokens, text, reason = run(pair, "one", [1, 504, 3458], SamplingParams(temperature=0.0, max_tokens=1))
    assert len(tokens) == 1 and reason == "length" and text
    assert_idle(pair)
