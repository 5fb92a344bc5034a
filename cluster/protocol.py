"""What the front ends (gRPC, HTTP) and the controller say to each other: the events a request
streams back, the model they serve, and the errors that become status codes.

    front end ── Backend.prepare(model, prompt | token ids | messages, params) ──► prompt ids
              ── Backend.generate(request_id, prompt ids, params) ──► Delta* then one Final
              ◄─ PDServeError subclasses, mapped by `status_of` to one gRPC code and HTTP status

Closing the `generate` iterator early (client cancelled or disconnected) aborts the request on
every instance that holds it. Messages are frozen dataclasses of primitives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.errors import (
    InvalidChatMessagesError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    PDServeError,
    TokenizerUnavailableError,
)
from engine.sampling_params import SamplingParams


class UnknownModelError(PDServeError, LookupError):
    """The request names a model this cluster does not serve (NOT_FOUND / 404)."""


class Unavailable(PDServeError, RuntimeError):
    """No healthy instance could serve the request after bounded retries (UNAVAILABLE / 503)."""


class Overloaded(PDServeError, RuntimeError):
    """No capacity now: the queue is at its bound or no instance can take the request
    (RESOURCE_EXHAUSTED / 429; retry later)."""


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float  # of the chosen token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) alternatives, best first


@dataclass(frozen=True)
class Delta:
    """What one or more decode steps added: whole characters only, never text a stop string could
    still take back."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when asked for


@dataclass(frozen=True)
class Timings:
    """Seconds from the request's arrival at the front end."""

    queued: float = 0.0  # until its prefill started
    ttft: float = 0.0  # until the first token
    transfer: float = 0.0  # moving its KV from prefill to decode
    prefill: float = 0.0  # its prompt's forward passes on the prefill instance
    tpot: float = 0.0  # mean time per output token after the first
    e2e: float = 0.0  # until the final event


@dataclass(frozen=True)
class Final:
    request_id: str
    finish_reason: str  # stop | length | abort | error
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    error: str = ""  # what went wrong, when finish_reason is "error"


@dataclass(frozen=True)
class ModelCard:
    id: str
    max_model_len: int
    dtype: str


class Backend(Protocol):
    """What a front end needs from the cluster (the Controller implements it)."""

    @property
    def model(self) -> ModelCard: ...

    def prepare(
        self,
        model: str,
        params: SamplingParams,
        prompt: str | None = None,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Exactly one of prompt / token_ids / messages; the prompt's token ids, or a PDServeError
        saying what is wrong."""
        ...

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta | Final]: ...

    def is_healthy(self) -> bool: ...


class Unauthenticated(PDServeError, PermissionError):
    """A missing or wrong auth token (UNAUTHENTICATED / 401)."""


_STATUS: list[tuple[type[BaseException], str, int]] = [
    (Unauthenticated, "UNAUTHENTICATED", 401),
    (UnknownModelError, "NOT_FOUND", 404),
    (Overloaded, "RESOURCE_EXHAUSTED", 429),
    (Unavailable, "UNAVAILABLE", 503),
    (InvalidPromptError, "INVALID_ARGUMENT", 400),
    (InvalidSamplingParamsError, "INVALID_ARGUMENT", 400),
    (InvalidChatMessagesError, "INVALID_ARGUMENT", 400),
    (TokenizerUnavailableError, "INVALID_ARGUMENT", 400),
]


def status_of(exc: BaseException) -> tuple[str, int]:
    """The gRPC status code name and HTTP status for an error reaching a front end; anything not
    listed is the server's fault (INTERNAL / 500)."""
    for cls, code, http in _STATUS:
        if isinstance(exc, cls):
            return code, http
    return "INTERNAL", 500
