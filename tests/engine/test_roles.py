"""The engine's prefill and decode roles, joined by the KV-transfer layer, give exactly the
colocated engine's greedy tokens (with chunked prefill and layer-wise sending too), and every
block on both sides comes back."""

from __future__ import annotations

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import InvalidPromptError
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.transports.local import LocalConnection, LocalServer

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


class Disaggregated:
    """A prefill engine and a decode engine over one loaded model, KV over the local transport."""

    def __init__(self, loaded, max_num_batched_tokens: int = 1024) -> None:
        config = EngineConfig(
            device="cpu",
            dtype="float32",
            kv_cache_memory=32 << 20,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=8,
        )
        self.prefill = LLMEngine(config, loaded=loaded, role="prefill")
        self.decode = LLMEngine(config, loaded=loaded, role="decode")
        layout = KVLayout.of_cache(loaded.config, self.prefill.runner.kv_cache)
        self.p_alloc, self.d_alloc = self.prefill.scheduler.allocator, self.decode.scheduler.allocator
        self.d_alloc.allocate(3)  # so the decode side's block ids differ from the prefill side's
        self.receiver = KVReceiver(self.decode.runner.kv_cache, layout, self.d_alloc)
        self.server = LocalServer(self.receiver)
        self.sender = KVSender(self.prefill.runner.kv_cache, layout, self.p_alloc)
        self.connection = LocalConnection(self.server.address)
        self.frames_during_prefill = 0

    def layer_hook(self, finishing: list[tuple[str, list[int]]], layer: int) -> None:
        """Layer-wise: start each finishing request's transfer at layer 0, send each layer as stored."""
        for request_id, blocks in finishing:
            if layer == 0:
                self.p_alloc.incref(blocks)  # the sender's own reference
                self.sender.start(request_id, blocks, self.connection)
            self.sender.send_layers(request_id, layer + 1)
            self.frames_during_prefill += 1

    def run(self, prompts: list[list[int]], params: SamplingParams, layerwise: bool) -> dict[str, list[int]]:
        ids = {self.prefill.add_request(p, params): p for p in prompts}
        for request_id, prompt in ids.items():
            self.receiver.reserve(request_id, len(prompt))
        results: dict[str, list[int]] = {}
        while self.prefill.has_unfinished_requests():
            for out in self.prefill.step(self.layer_hook if layerwise else None):
                if not out.finished:
                    continue
                assert out.kv_blocks is not None
                if layerwise:
                    self.p_alloc.free(out.kv_blocks)  # the engine's reference; the sender keeps its own
                else:
                    self.sender.start(out.request_id, out.kv_blocks, self.connection)
                if out.finish_reason != "prefilled":  # its first token was its last
                    self.sender.abort(out.request_id)
                    self.receiver.abort(out.request_id)
                    results[out.request_id] = out.token_ids
                    continue
                self.sender.finish(out.request_id)
                blocks = self.receiver.take(out.request_id)
                self.decode.add_prefilled(
                    out.request_id, ids[out.request_id], out.token_ids[0], params, blocks
                )
        while self.decode.has_unfinished_requests():
            for out in self.decode.step():
                if out.finished:
                    results[out.request_id] = out.token_ids
        return {request_id: results[request_id] for request_id in ids}

    def assert_all_blocks_back(self) -> None:
        assert self.p_alloc.num_free_blocks == self.p_alloc.num_blocks
        assert self.d_alloc.num_free_blocks == self.d_alloc.num_blocks - 3
        assert self.sender.num_held_blocks == 0 and self.receiver.num_reserved_blocks == 0


@pytest.fixture(scope="module")
def prompts(embedded_llm):
    texts = ["The history of the printing press", "Once upon a time, in a land far away, there", "Hi"]
    ids = [embedded_llm.tokenizer.encode(t) for t in texts]
    return ids + [ids[0] * 12]  # a long one: chunked prefill under a small token budget


@pytest.fixture(scope="module")
def colocated(embedded_llm, prompts):
    return [o.token_ids for o in embedded_llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("layerwise", [False, True])
def test_prefill_then_decode_equals_colocated(embedded_loaded, prompts, colocated, layerwise):
    pd = Disaggregated(embedded_loaded, max_num_batched_tokens=128)
    outputs = pd.run(prompts, GREEDY, layerwise)
    assert list(outputs.values()) == colocated
    if layerwise:  # every layer of every request was sent while its prefill ran
        assert pd.frames_during_prefill == len(prompts) * embedded_loaded.config.num_layers
    pd.assert_all_blocks_back()


def test_a_first_token_that_ends_the_request_hands_its_blocks_back(embedded_loaded, prompts):
    pd = Disaggregated(embedded_loaded)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    request_id = pd.prefill.add_request(prompts[0], one)
    outs = [o for o in pd.prefill.step() if o.request_id == request_id]
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 1 and outs[0].kv_blocks
    assert pd.p_alloc.num_free_blocks == pd.p_alloc.num_blocks - len(outs[0].kv_blocks)  # the caller's now
    pd.p_alloc.free(outs[0].kv_blocks)
    pd.assert_all_blocks_back()


def test_a_request_finished_on_arrival_is_still_returned(embedded_loaded, prompts):
    pd = Disaggregated(embedded_loaded)
    blocks = pd.d_alloc.allocate(1)
    pd.decode.add_prefilled("r", prompts[2], 42, SamplingParams(max_tokens=1), blocks)
    assert pd.decode.has_unfinished_requests()  # its output is waiting for the next step
    (out,) = pd.decode.step()
    assert (out.request_id, out.token_ids, out.finish_reason) == ("r", [42], "length")
    assert not pd.decode.has_unfinished_requests()
    pd.assert_all_blocks_back()


def test_decode_side_refuses_a_mismatched_hand_off(embedded_loaded, prompts):
    pd = Disaggregated(embedded_loaded)
    blocks = pd.d_alloc.allocate(1)
    with pytest.raises(InvalidPromptError, match="need 3 KV blocks, got 1"):
        pd.decode.add_prefilled("r", [5] * 40, 7, GREEDY, blocks)
    with pytest.raises(InvalidPromptError, match="first token 99999"):
        pd.decode.add_prefilled("r", [5] * 10, 99999, GREEDY, blocks)
    assert not pd.decode.has_unfinished_requests()
    pd.d_alloc.free(blocks)
    pd.assert_all_blocks_back()
