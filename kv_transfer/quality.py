"""How much a codec costs in model quality: the perplexity of continuations whose prompt KV went
through the whole transfer path (KVSender -> frames -> KVReceiver) with that codec.

Each window: prefill `prompt_len` tokens into blocks the sender owns, transfer their KV to blocks
the receiver reserved (encoded, framed, checksummed, decoded), then score the next
`continuation_len` tokens attending to the received KV, as a decode worker would. The text is
the Python Language Reference shipped with every CPython (pydoc_data): natural English prose
that nobody wrote for this test, and present on every machine that runs pdserve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.block_manager import BlockAllocator, blocks_needed
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence as EngineSequence
from kv_transfer.codecs import CodecSpec
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.transports.local import LocalConnection, LocalServer

REFERENCE_TOPICS = ("execmodel", "naming", "import", "exceptions", "assignment", "compound")


def reference_text() -> str:
    """Chapters of the Python Language Reference, as shipped in CPython's pydoc_data."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in REFERENCE_TOPICS if name in topics)


@dataclass(frozen=True)
class QualityResult:
    codec: CodecSpec
    perplexity: float
    num_tokens: int  # continuation tokens scored


def transfer_perplexity(
    runner: ModelRunner,
    token_ids: Sequence[int],
    codec: CodecSpec,
    prompt_len: int = 512,
    continuation_len: int = 128,
    num_windows: int = 16,
) -> QualityResult:
    """Perplexity over `num_windows` windows of prompt_len + continuation_len tokens, consecutive
    windows starting continuation_len tokens apart."""
    window = prompt_len + continuation_len
    if len(token_ids) < window + (num_windows - 1) * continuation_len:
        raise ValueError(f"{len(token_ids)} tokens are too few for {num_windows} windows of {window}")
    if prompt_len % runner.block_size:
        raise ValueError(f"prompt_len must be a multiple of the block size {runner.block_size}")
    cache = runner.kv_cache
    layout = KVLayout.of_cache(runner.config, cache)
    allocator = BlockAllocator(runner.num_blocks)
    receiver = KVReceiver(cache, layout, allocator)
    server = LocalServer(receiver)
    sender = KVSender(cache, layout, allocator, codec)
    connection = LocalConnection(server.address)
    greedy = SamplingParams(temperature=0.0)
    total_nll, scored = 0.0, 0
    try:
        for w in range(num_windows):
            ids = list(token_ids[w * continuation_len : w * continuation_len + window])
            # Prefill the prompt into the sender's blocks.
            prefill_blocks = allocator.allocate(blocks_needed(prompt_len, runner.block_size))
            prompt = ids[:prompt_len]
            seq = EngineSequence(f"w{w}", prompt, prompt_len, greedy, 0.0, block_table=prefill_blocks)
            runner.compute_logits([ScheduledChunk(seq, prompt_len)])
            # Move its KV through the codec and the frame path into the receiver's blocks.
            receiver.reserve(seq.request_id, prompt_len)
            sender.start(seq.request_id, prefill_blocks, connection)
            sender.finish(seq.request_id)
            blocks = receiver.take(seq.request_id)
            # Score the continuation on top of the received KV.
            blocks += allocator.allocate(blocks_needed(window, runner.block_size) - len(blocks))
            seq = EngineSequence(f"d{w}", ids, window, greedy, 0.0, block_table=blocks)
            seq.num_computed_tokens = prompt_len
            logits = runner.compute_all_logits([ScheduledChunk(seq, continuation_len)])
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(ids[prompt_len + 1 :])
            total_nll -= logprobs.gather(1, targets[:, None]).sum().item()
            scored += targets.numel()
            allocator.free(blocks)
    finally:
        connection.close()
        server.close()
    return QualityResult(codec, math.exp(total_nll / scored), scored)
