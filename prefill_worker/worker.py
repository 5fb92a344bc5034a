"""`PrefillWorker`: one prefill instance. It runs prompts through the engine in its prefill role,
streams each request's KV to the decode instance the router chose while the layers are computed,
holds the blocks under a lease until that instance acknowledges, and answers with the first token.

    submit(PrefillRequest) ──► engine queue ──► batched prefill (token budget, chunked)
                                                  │ each layer stored ──► KVSender.send_layers
                                                  ▼ first token
                       PrefillResult ◄── ack ◄── KVSender.finish (on a finisher thread)

A request whose first token is also its last ("stop"/"length") needs no decode: its transfer is
aborted (the decode side frees its reservation) and the result says so. Any transfer failure
fails only that request, with the sender having freed its blocks. On a tensor- or
pipeline-parallel instance every rank sends its own part of the KV (layer by layer from its own
forward with tensor parallelism, once the step ends with pipeline stages:
kv_transfer/instance_sender.py).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from cluster.protocol import TokenLogprob
from cluster.router import PrefillLoad
from engine.engine_loop import EngineLoop
from engine.errors import PDServeError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer.errors import TransferError
from kv_transfer.instance_sender import InstanceSender
from kv_transfer.resharding import KVDestination
from kv_transfer.sender import SendState


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str  # unique per attempt
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    destination: KVDestination  # the decode instance's layout and the KV servers of its ranks


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int
    text: str  # the first token's text ("" while a stop string could still take it back)
    logprob: TokenLogprob | None
    finish_reason: str  # "prefilled" (decode continues), "stop" or "length" (done), "error"
    error: str = ""
    queue_s: float = 0.0  # arrival here -> first scheduled
    prefill_s: float = 0.0  # first scheduled -> first token
    transfer_s: float = 0.0  # first token -> decode acknowledged the KV


@dataclass
class _Pending:
    request: PrefillRequest
    future: Future
    arrival: float
    transfer_error: BaseException | None = None


class PrefillWorker:
    def __init__(
        self,
        engine: LLMEngine,
        sender: InstanceSender,
        layerwise: bool = True,
        max_finishing: int = 16,
    ) -> None:
        if engine.role != "prefill":
            raise ValueError(f"a PrefillWorker needs an engine in the prefill role, got {engine.role!r}")
        self.engine = engine
        self.sender = sender
        self.allocator = engine.scheduler.allocator
        self.layerwise = layerwise and sender.layerwise
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._finisher = ThreadPoolExecutor(max_finishing, thread_name_prefix="kv-finish")
        self.loop = EngineLoop(
            engine,
            self._on_outputs,
            layer_hook=self._on_layer_stored if self.layerwise else None,
            housekeeping=self.sender.expire,
            name="prefill-loop",
        )

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
        self._finisher.shutdown(wait=False, cancel_futures=True)
        self.sender.close()

    # --- requests -----------------------------------------------------------------------------

    def submit(self, request: PrefillRequest) -> Future:
        """A Future of the PrefillResult; bad input fails it with the engine's PDServeError."""
        future: Future = Future()
        with self._lock:
            if request.request_id in self._pending:
                future.set_exception(PDServeError(f"request id {request.request_id!r} is already here"))
                return future
            self._pending[request.request_id] = _Pending(request, future, time.monotonic())

        try:
            self.sender.prepare(request.request_id, request.destination)  # tensor-parallel ranks
        except Exception as exc:  # noqa: BLE001 - fails this request only
            self._resolve(request.request_id, exc)
            return future

        def add() -> None:
            try:
                self.engine.add_request(list(request.prompt_token_ids), request.params, request.request_id)
            except BaseException as exc:
                self._resolve(request.request_id, exc)

        self.loop.submit(add)
        return future

    def abort(self, request_id: str) -> None:
        """Drop the request wherever it is: queued, prefilling, or waiting for the ack."""

        def drop() -> None:
            out = self.engine.abort_request(request_id)
            if out is not None and out.kv_blocks:
                self.allocator.free(out.kv_blocks)
            self.sender.abort(request_id, "the request was cancelled")
            self._resolve(request_id, PDServeError(f"request {request_id!r} was aborted"))

        self.loop.submit(drop)

    def load(self) -> PrefillLoad:
        with self._lock:
            pending = list(self._pending.values())
        tokens = sum(len(p.request.prompt_token_ids) for p in pending)
        return PrefillLoad(pending_tokens=tokens, running=len(pending), healthy=self.loop.is_alive)

    # --- the loop thread ----------------------------------------------------------------------

    def _start_transfer(self, request_id: str, blocks: list[int], pending: _Pending) -> bool:
        """Hand one reference to `blocks` to the sender; False (and the error kept) if it fails."""
        try:
            self.sender.start(request_id, blocks, pending.request.destination)
            return True
        except Exception as exc:  # noqa: BLE001 - fails this request only
            self.allocator.free(blocks)
            pending.transfer_error = exc
            return False

    def _on_layer_stored(self, finishing: list[tuple[str, list[int]]], layer: int) -> None:
        for request_id, blocks in finishing:
            pending = self._pending.get(request_id)
            if pending is None or pending.transfer_error is not None:
                continue
            if layer == 0:
                self.allocator.incref(blocks)  # the sender's own reference
                if not self._start_transfer(request_id, blocks, pending):
                    continue
            try:
                self.sender.send_layers(request_id, layer + 1)
            except Exception as exc:  # noqa: BLE001 - the sender freed its blocks; fails this request only
                pending.transfer_error = exc

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if not out.finished:
                continue
            pending = self._pending.get(out.request_id)
            started = self.sender.state(out.request_id) is SendState.SENDING
            if out.kv_blocks:
                if pending is not None and not started and out.finish_reason == "prefilled":
                    started = self._start_transfer(out.request_id, out.kv_blocks, pending)
                else:
                    self.allocator.free(out.kv_blocks)  # the engine's reference
            if pending is None:
                if started:
                    self.sender.abort(out.request_id, "the request was dropped")
                continue
            if out.finish_reason == "prefilled" and started:
                self._finisher.submit(self._finish_transfer, out, pending)
                continue
            if started:
                self.sender.abort(out.request_id, "the request finished with its first token")
            if out.finish_reason == "prefilled":  # its transfer could not start or failed
                error = pending.transfer_error or TransferError("the KV transfer did not start")
                self._resolve(out.request_id, error)
            else:
                self._resolve(out.request_id, self._result(out, pending, None))

    def _finish_transfer(self, out: RequestOutput, pending: _Pending) -> None:
        try:
            self.sender.finish(out.request_id)
        except BaseException as exc:  # noqa: BLE001 - the caller retries elsewhere
            self._resolve(out.request_id, exc)
            return
        self._resolve(out.request_id, self._result(out, pending, time.monotonic()))

    def _result(self, out: RequestOutput, pending: _Pending, acked: float | None) -> PrefillResult:
        t = out.timeline
        scheduled = t.first_scheduled or t.arrival
        first = t.first_token or scheduled
        logprob = None
        if out.logprobs is not None:
            top = tuple(out.top_logprobs[0] or ()) if out.top_logprobs else ()
            logprob = TokenLogprob(float(out.logprobs[0] or 0.0), top)
        holds_back = out.finish_reason == "prefilled" and pending.request.params.stop
        text = "" if holds_back else out.text
        return PrefillResult(
            request_id=out.request_id,
            first_token=out.token_ids[0] if out.token_ids else -1,
            text=text,
            logprob=logprob,
            finish_reason=out.finish_reason or "error",
            error=str(out.error) if out.error is not None else "",
            queue_s=max(0.0, scheduled - pending.arrival),
            prefill_s=max(0.0, first - scheduled),
            transfer_s=max(0.0, acked - first) if acked is not None else 0.0,
        )

    def _resolve(self, request_id: str, outcome: PrefillResult | BaseException) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is None or pending.future.done():
            return
        if isinstance(outcome, BaseException):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)
