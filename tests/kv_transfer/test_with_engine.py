"""The transfer layer on the real model: prefill on one runner, stream its KV layer by layer as each
layer is computed, decode on another runner from the received blocks, and get exactly the tokens
the colocated engine generates; and each codec's perplexity cost stays inside its goal."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.block_manager import BlockAllocator, blocks_needed
from engine.kv_cache import CacheConfig
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence
from kv_transfer.codecs import CodecSpec
from kv_transfer.layout import KVLayout
from kv_transfer.quality import reference_text, transfer_perplexity
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.transport import Frame
from kv_transfer.transports.local import LocalConnection, LocalServer

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


class CountingSink:
    """Wraps the receiver to record, per frame, how many layers the prefill had stored by then."""

    def __init__(self, receiver: KVReceiver, progress: list[int]) -> None:
        self.receiver, self.progress, self.layers_done_at_frame = receiver, progress, []

    def on_frame(self, frame: Frame) -> None:
        self.layers_done_at_frame.append(len(self.progress))
        self.receiver.on_frame(frame)

    def on_end(self, request_id: str, num_frames: int) -> None:
        self.receiver.on_end(request_id, num_frames)

    def on_abort(self, request_id: str, reason: str) -> None:
        self.receiver.on_abort(request_id, reason)


def test_layerwise_disaggregated_decode_matches_colocated(embedded_loaded, embedded_llm):
    ids = embedded_llm.tokenizer.encode("The history of the printing press begins in")
    colocated = embedded_llm.generate(ids, GREEDY, use_tqdm=False)[0].token_ids

    device, config = torch.device("cpu"), CacheConfig(memory_bytes=16 << 20)
    prefill = ModelRunner(embedded_loaded.model, config, device)
    decode = ModelRunner(embedded_loaded.model, config, device)
    layout = KVLayout.of_cache(embedded_loaded.config, prefill.kv_cache)
    p_alloc, d_alloc = BlockAllocator(prefill.num_blocks), BlockAllocator(decode.num_blocks)
    d_alloc.allocate(5)  # the decode side's block ids differ from the prefill side's
    receiver = KVReceiver(decode.kv_cache, layout, d_alloc)
    stored: list[int] = []
    sink = CountingSink(receiver, stored)
    server = LocalServer(sink)
    sender = KVSender(prefill.kv_cache, layout, p_alloc, CodecSpec("none"))

    # Prefill, sending each layer's KV the moment it is stored.
    blocks = p_alloc.allocate(blocks_needed(len(ids), layout.block_size))
    receiver.reserve("r", len(ids))
    sender.start("r", blocks, LocalConnection(server.address))

    def on_layer_stored(layer: int) -> None:
        stored.append(layer)
        sender.send_layers("r", layer + 1)

    seq = Sequence("r", list(ids), len(ids), GREEDY, 0.0, block_table=blocks)
    first = int(prefill.compute_logits([ScheduledChunk(seq, len(ids))], on_layer_stored)[0].argmax())
    sender.finish("r")
    assert sink.layers_done_at_frame == list(range(1, layout.num_layers + 1))  # overlapped with compute
    assert p_alloc.num_free_blocks == p_alloc.num_blocks  # prefill freed its blocks on the ack

    # Decode from the received blocks.
    seq = Sequence("r", [*ids, first], len(ids), GREEDY, 0.0, block_table=receiver.take("r"))
    seq.num_computed_tokens = len(ids)
    tokens = [first]
    while len(tokens) < len(colocated):
        need = blocks_needed(seq.num_tokens, layout.block_size) - len(seq.block_table)
        seq.block_table += d_alloc.allocate(need)
        token = int(decode.compute_logits([ScheduledChunk(seq, 1)])[0].argmax())
        seq.num_computed_tokens += 1
        seq.token_ids.append(token)
        tokens.append(token)
    assert tokens == colocated


@pytest.fixture(scope="module")
def quality(embedded_loaded):
    runner = ModelRunner(embedded_loaded.model, CacheConfig(memory_bytes=64 << 20), torch.device("cpu"))
    ids = embedded_loaded.tokenizer.encode(reference_text())

    def perplexity(codec: str) -> float:
        return transfer_perplexity(runner, ids, CodecSpec(codec), 512, 128, num_windows=3).perplexity

    return perplexity


def test_codec_perplexity_goals(quality):
    """fp8 and int8 within +1% of `none`, int4 within +5% (full figures: scripts/eval_kv_quality.py)."""
    base = quality("none")
    assert quality("fp8") <= base * 1.01
    assert quality("int8") <= base * 1.01
    assert quality("int4") <= base * 1.05
