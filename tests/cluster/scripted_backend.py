"""A Backend for front-end tests that isolate the protocol translation (JSON / protobuf in, events
out, status codes): real request validation on the embedded model's tokenizer, and a scripted
`generate` that streams a fixed reply, or raises a given error, and records what was cancelled.
End-to-end tests run the front ends on the real cluster instead (tests/cluster/test_e2e.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cluster.protocol import Delta, Final, ModelCard, Timings, TokenLogprob
from cluster.validation import RequestValidator
from engine.model_loader import resolve_checkpoint
from engine.sampling_params import SamplingParams

MODEL_ID = "smollm2-135m"


class ScriptedBackend:
    def __init__(self, reply: str = " Paris is the capital.", max_tokens_limit: int = 256) -> None:
        checkpoint = resolve_checkpoint(MODEL_ID)
        self.tokenizer = checkpoint.tokenizer()
        self.model = ModelCard(MODEL_ID, 2048, "float32")
        self.validator = RequestValidator(
            self.model, self.tokenizer, checkpoint.config.vocab_size, max_tokens_limit
        )
        self.reply_ids = self.tokenizer.encode(reply, add_special_tokens=False)
        self.error: BaseException | None = None  # raised by the next generate, before any event
        self.delay = 0.0  # seconds between tokens
        self.healthy = True
        self.started: list[tuple[str, list[int], SamplingParams]] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    def prepare(self, model, params, prompt=None, token_ids=None, messages=None) -> list[int]:
        return self.validator.prepare(model, params, prompt=prompt, token_ids=token_ids, messages=messages)

    def is_healthy(self) -> bool:
        return self.healthy

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta | Final]:
        self.started.append((request_id, prompt_ids, params))
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        ids = self.reply_ids[: params.max_tokens]
        try:
            for token in ids:
                await asyncio.sleep(self.delay)
                logprobs = None
                if params.logprobs is not None:
                    logprobs = (
                        TokenLogprob(-0.5, tuple((token + k, -0.5 - k) for k in range(params.logprobs))),
                    )
                yield Delta((token,), self.tokenizer.decode([token]), logprobs)
            reason = "length" if len(ids) == params.max_tokens else "stop"
            yield Final(
                request_id,
                reason,
                len(prompt_ids),
                len(ids),
                Timings(queued=0.001, ttft=0.01, transfer=0.002, prefill=0.004, tpot=0.005, e2e=0.05),
            )
            self.finished.append(request_id)
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled.append(request_id)
            raise
