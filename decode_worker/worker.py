"""`DecodeWorker`: one decode instance. It reserves blocks for a request's KV before prefill runs,
adopts the request once the KV has arrived, decodes it in the running batch, and streams what
each step adds. With an engine in the colocated role (and no receiver) it is a colocated replica:
`submit` hands it a fresh prompt, which it prefills in chunks between decode steps.

    reserve(request, num_prompt_tokens)        blocks reserved on every rank (deadline set)
        ... KV frames arrive through the transport server into those blocks, then the ack ...
    start(request, prompt, first_token, params)
        receiver.take ──► engine.add_prefilled ──► running batch
        every step: emit([DecodeChunk, ...]) once, one chunk per request with new tokens or text;
        a request's last chunk has finish_reason
    abort(request)                             wherever it is: reserved, receiving, or decoding
    submit(request, prompt, params)            colocated: prefill here, then as above from the
                                               first token on

The receiver is an InstanceReceiver (kv_transfer/instance_receiver.py): on a tensor- or
pipeline-parallel instance each rank receives its own part of the KV. The engine and the
receiver's reservations are touched only on the loop thread; blocks come back
to the allocator when a request finishes, fails, is aborted, or its KV never arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from cluster.protocol import TokenLogprob
from cluster.router import DecodeLoad
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer.instance_receiver import InstanceReceiver


@dataclass(frozen=True)
class DecodeChunk:
    """What one step added to one request; `finish_reason` is set on its last chunk."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    error: str = ""


@dataclass
class _Stream:
    num_tokens: int = 1  # the first token came from prefill
    text_len: int = 0
    unprefilled: int = 0  # colocated: prompt tokens until its first token (router load)


class DecodeWorker:
    def __init__(
        self,
        engine: LLMEngine,
        receiver: InstanceReceiver | None,
        emit: Callable[[list[DecodeChunk]], None],
    ) -> None:
        """`emit` gets every request's chunks of a step in one call (on the loop thread), so one
        consumer carries the whole batch onward as one message. A decode engine needs the
        receiver its KV arrives through; a colocated engine has none."""
        if (engine.role, receiver is None) not in (("decode", False), ("colocated", True)):
            raise ValueError(
                "a DecodeWorker needs a decode engine with a receiver or a colocated engine without "
                f"one, got a {engine.role} engine {'without' if receiver is None else 'with'} a receiver"
            )
        self.engine = engine
        self.receiver = receiver
        self.emit = emit
        self.allocator = engine.scheduler.allocator
        self._streams: dict[str, _Stream] = {}
        self._pending_tokens = 0  # colocated: prompt tokens not yet prefilled (loop thread writes)
        self.loop = EngineLoop(
            engine,
            self._on_outputs,
            housekeeping=receiver.expire if receiver is not None else None,
            name=f"{engine.role}-loop",
        )

    def start_loop(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    # --- requests (any thread) ----------------------------------------------------------------

    def reserve(self, request_id: str, num_prompt_tokens: int) -> Future:
        """Blocks for the prompt's KV; the Future fails with ReservationError when there is no room."""
        receiver = self._receiver()
        return self.loop.submit(lambda: len(receiver.reserve(request_id, num_prompt_tokens)))

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Future:
        """Colocated: prefill and decode a fresh request here; all its tokens come through `emit`.
        The Future fails with the engine's error (e.g. InvalidPromptError) and nothing is kept."""
        if self.receiver is not None:
            raise ValueError("submit is for colocated replicas; a decode instance adopts prefilled requests")

        def add() -> None:
            self.engine.add_request(list(prompt_token_ids), params, request_id)
            self._streams[request_id] = _Stream(num_tokens=0, unprefilled=len(prompt_token_ids))
            self._pending_tokens += len(prompt_token_ids)

        return self.loop.submit(add)

    def start(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        first_text: str,
        params: SamplingParams,
    ) -> Future:
        """Continue a prefilled request whose KV transfer completed; `first_text` is the text of
        `first_token` the client already has. Fails (blocks freed) if the KV is not complete."""

        receiver = self._receiver()

        def adopt() -> None:
            blocks = receiver.take(request_id)
            try:
                self.engine.add_prefilled(request_id, prompt_token_ids, first_token, params, blocks)
            except BaseException:
                self.allocator.free(blocks)
                raise
            self._streams[request_id] = _Stream(text_len=len(first_text))

        return self.loop.submit(adopt)

    def abort(self, request_id: str) -> Future:
        def drop() -> None:
            if self.receiver is not None:
                self.receiver.abort(request_id, "the request was cancelled")
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._pending_tokens -= stream.unprefilled
            if self.engine.abort_request(request_id) is not None and stream is not None:
                self.emit([DecodeChunk(request_id, (), "", finish_reason="abort")])

        return self.loop.submit(drop)

    def load(self) -> DecodeLoad:
        scheduler = self.engine.scheduler
        transfers = self.receiver.num_transfers if self.receiver is not None else 0
        return DecodeLoad(
            free_blocks=self.allocator.num_free_blocks,
            block_size=scheduler.block_size,
            running=len(self._streams) + transfers,
            max_batch=scheduler.config.max_num_seqs,
            healthy=self.loop.is_alive,
            pending_tokens=self._pending_tokens,
        )

    def _receiver(self) -> InstanceReceiver:
        if self.receiver is None:
            raise ValueError("a colocated replica prefills its own prompts; it takes no transferred KV")
        return self.receiver

    # --- the loop thread ----------------------------------------------------------------------

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        chunks = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            new_ids = tuple(out.token_ids[stream.num_tokens :])
            logprobs = None
            if out.logprobs is not None:
                tops = out.top_logprobs or [None] * len(out.logprobs)
                logprobs = tuple(
                    TokenLogprob(float(lp or 0.0), tuple(top or ()))
                    for lp, top in zip(
                        out.logprobs[stream.num_tokens :], tops[stream.num_tokens :], strict=True
                    )
                )
            text = out.text[stream.text_len :] if len(out.text) > stream.text_len else ""
            stream.num_tokens = len(out.token_ids)
            if stream.unprefilled and (out.token_ids or out.finished):  # prefilled (or failed)
                self._pending_tokens -= stream.unprefilled
                stream.unprefilled = 0
            stream.text_len = max(stream.text_len, len(out.text))
            reason = out.finish_reason if out.finished else None
            if out.finished:
                del self._streams[out.request_id]
            if new_ids or text or reason:
                error = str(out.error) if out.error is not None else ""
                chunks.append(DecodeChunk(out.request_id, new_ids, text, logprobs, reason, error))
        if chunks:
            self.emit(chunks)
