"""What the engine hands back per request."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import PDServeError


@dataclass(frozen=True)
class RequestTimeline:
    """Wall-clock (time.monotonic) marks of a request's life; what TTFT/TPOT are computed from."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens so far (all of them once finished)
    text: str  # generated text so far (stop string excluded)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | "prefilled"
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None
    timeline: RequestTimeline | None = None
    error: PDServeError | None = field(default=None, compare=False)
    # Prefill role: the request's KV blocks, handed to the caller with its first token.
    kv_blocks: list[int] | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
