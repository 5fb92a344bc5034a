"""Translation between the OpenAI HTTP API and the cluster's types: request JSON in (one prompt, one
SamplingParams), response JSON and streaming chunks out, for `/v1/completions` and
`/v1/chat/completions`.

Extensions beyond OpenAI's fields, as in vLLM: top_k, stop_token_ids, ignore_eos, min_tokens,
skip_special_tokens. Fields that would change the output but are not implemented (n > 1, best_of,
echo, suffix, logit_bias, penalties, tools, structured output) are refused, naming the field; other
unknown keys are ignored, as OpenAI does.

Logprob tokens are the token's text when the backend exposes a `tokenizer` with `decode`, and
"token_id:<id>" otherwise (vLLM's `return_tokens_as_token_ids` spelling).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.protocol import Delta, Final, TokenLogprob
from engine.errors import InvalidChatMessagesError, InvalidPromptError, PDServeError
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

DEFAULT_MAX_TOKENS = 16

# Sampling fields passed through as they are; SamplingParams checks their types and ranges.
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
)

# Fields that would change the output and that this server does not implement: each is accepted only
# at a value that means "off".
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v is None or v == 1,
    "echo": lambda v: v is None or v is False,
    "suffix": lambda v: v is None or v == "",
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "repetition_penalty": lambda v: v is None or v == 1,
    "min_p": lambda v: v is None or v == 0,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": lambda v: not v,
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
}


class BadRequest(PDServeError, ValueError):
    """The request body is not what the OpenAI API accepts (400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OpenAIRequest:
    """One parsed request: exactly one of prompt / token_ids / messages is set."""

    model: str
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    prompt: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None

    def prompt_kwargs(self) -> dict[str, Any]:
        """The prompt as `Backend.prepare` takes it."""
        return {"prompt": self.prompt, "token_ids": self.token_ids, "messages": self.messages}


# ---- requests ----


def parse_completion_request(body: dict[str, Any]) -> OpenAIRequest:
    """A `/v1/completions` body as an OpenAIRequest, or BadRequest / a PDServeError naming the problem."""
    _check_common(body)
    logprobs = body.get("logprobs")
    prompt, token_ids = _one_prompt(body.get("prompt"))
    params = _sampling_params(body, body.get("max_tokens"), logprobs)
    stream, include_usage = _stream_flags(body)
    return OpenAIRequest(_model(body), params, stream, include_usage, prompt=prompt, token_ids=token_ids)


def parse_chat_request(body: dict[str, Any]) -> OpenAIRequest:
    """A `/v1/chat/completions` body as an OpenAIRequest, or BadRequest / a PDServeError naming the
    problem."""
    _check_common(body)
    want_logprobs = body.get("logprobs")
    top = body.get("top_logprobs")
    if want_logprobs not in (None, True, False):
        raise BadRequest(f"logprobs must be true or false, got {want_logprobs!r}", "logprobs")
    if top is not None and not want_logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if top is not None and not (_is_int(top) and 0 <= top <= MAX_LOGPROBS):
        raise BadRequest(f"top_logprobs must be an int in 0..{MAX_LOGPROBS}, got {top!r}", "top_logprobs")
    logprobs = (top or 0) if want_logprobs else None
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    params = _sampling_params(body, max_tokens, logprobs)
    stream, include_usage = _stream_flags(body)
    messages = _messages(body.get("messages"))
    return OpenAIRequest(_model(body), params, stream, include_usage, messages=messages)


def _check_common(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest(f"n={n!r} is not supported: one prompt per request, one choice (n must be 1)", "n")
    for name, is_off in _UNSUPPORTED.items():
        if name in body and not is_off(body[name]):
            raise BadRequest(f"{name}={body[name]!r} is not supported by this server; leave it out", name)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        return ""
    if not isinstance(model, str):
        raise BadRequest(f"model must be a string, got {type(model).__name__}", "model")
    return model


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise BadRequest(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict):
        raise BadRequest(f"stream_options must be an object, got {type(options).__name__}", "stream_options")
    include_usage = options.get("include_usage")
    if include_usage not in (None, True, False):
        raise BadRequest(f"stream_options.include_usage must be true or false, got {include_usage!r}")
    return bool(stream), bool(include_usage)


def _sampling_params(body: dict[str, Any], max_tokens: Any, logprobs: Any) -> SamplingParams:
    """SamplingParams raises InvalidSamplingParamsError naming any value of the wrong type or range."""
    given = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **given)


def _one_prompt(prompt: Any) -> tuple[str | None, list[int] | None]:
    """(text, None) or (None, token ids); OpenAI's batch forms are accepted with a single prompt."""
    if isinstance(prompt, str):
        return prompt, None
    if prompt is None:
        raise InvalidPromptError("prompt is required: a string or a list of token ids")
    if not isinstance(prompt, list):
        raise InvalidPromptError(
            f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
        )
    if all(_is_int(t) for t in prompt):
        return None, prompt  # the validator checks the ids against the vocabulary
    if len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidPromptError(f"one prompt per request: got a list of {len(prompt)} prompts")
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0], None
    if len(prompt) == 1 and isinstance(prompt[0], list):
        return None, prompt[0]
    raise InvalidPromptError("prompt must be a string or a list of token ids (ints)")


def _messages(messages: Any) -> Any:
    """Messages with OpenAI's list-of-parts content joined into text; the shape is checked by the
    backend's chat template."""
    if not isinstance(messages, list):
        got = "nothing" if messages is None else type(messages).__name__
        raise InvalidChatMessagesError(f"messages must be a list of {{'role', 'content'}} objects, got {got}")
    return [_flat_content(i, m) for i, m in enumerate(messages)]


def _flat_content(index: int, message: Any) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    texts = []
    for part in message["content"]:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidChatMessagesError(
                f"chat message {index}: only text content parts are supported, got {kind!r}"
            )
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- responses ----


def error_body(message: str, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; `code` is the gRPC-style status name (INVALID_ARGUMENT, NOT_FOUND...)."""
    kind = _ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def usage(final: Final) -> dict[str, int]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
    }


class _Format:
    """The response and stream chunks of one request, in the shape of one endpoint."""

    id_prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(
        self, model: str, token_text: Callable[[int], str], logprobs: bool, include_usage: bool = False
    ) -> None:
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.token_text = token_text
        self.logprobs = logprobs
        self.include_usage = include_usage

    def first_chunks(self) -> list[dict[str, Any]]:
        return []

    def usage_chunk(self, final: Final) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the token counts."""
        return {**self._envelope(self.chunk_object_name, []), "usage": usage(final)}

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _response(self, choice: dict[str, Any], final: Final) -> dict[str, Any]:
        choice = {"index": 0, **choice, "finish_reason": final.finish_reason}
        return {**self._envelope(self.object_name, [choice]), "usage": usage(final)}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object_name, [{"index": 0, **choice}])
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk but the last carries "usage": null
        return chunk


class CompletionFormat(_Format):
    id_prefix = "cmpl-"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streamed_chars = 0  # where the next chunk's text starts, for logprobs' text_offset

    def response(self, deltas: Sequence[Delta], final: Final) -> dict[str, Any]:
        text = "".join(d.text for d in deltas)
        logprobs = self._logprobs(deltas, 0) if self.logprobs else None
        return self._response({"text": text, "logprobs": logprobs}, final)

    def delta_chunk(self, delta: Delta) -> dict[str, Any] | None:
        """The chunk for one Delta, or None when it adds nothing to send."""
        if not delta.text and delta.logprobs is None:
            return None
        logprobs = self._logprobs([delta], self.streamed_chars) if delta.logprobs is not None else None
        self.streamed_chars += len(delta.text)
        return self._chunk({"text": delta.text, "logprobs": logprobs, "finish_reason": None})

    def finish_chunk(self, final: Final) -> dict[str, Any]:
        return self._chunk({"text": "", "logprobs": None, "finish_reason": final.finish_reason})

    def _logprobs(self, deltas: Sequence[Delta], offset: int) -> dict[str, list[Any]]:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, lp in _token_logprobs(deltas):
            text = self.token_text(token_id)
            tokens.append(text)
            token_logprobs.append(lp.logprob)
            top_logprobs.append({self.token_text(t): v for t, v in lp.top})
            text_offset.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }


class ChatFormat(_Format):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def response(self, deltas: Sequence[Delta], final: Final) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(d.text for d in deltas)}
        logprobs = self._logprobs(deltas) if self.logprobs else None
        return self._response({"message": message, "logprobs": logprobs}, final)

    def first_chunks(self) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [self._chunk({"delta": role, "logprobs": None, "finish_reason": None})]

    def delta_chunk(self, delta: Delta) -> dict[str, Any] | None:
        """The chunk for one Delta, or None when it adds nothing to send."""
        if not delta.text and delta.logprobs is None:
            return None
        logprobs = self._logprobs([delta]) if delta.logprobs is not None else None
        return self._chunk({"delta": {"content": delta.text}, "logprobs": logprobs, "finish_reason": None})

    def finish_chunk(self, final: Final) -> dict[str, Any]:
        return self._chunk({"delta": {}, "logprobs": None, "finish_reason": final.finish_reason})

    def _logprobs(self, deltas: Sequence[Delta]) -> dict[str, list[dict[str, Any]]]:
        content = []
        for token_id, lp in _token_logprobs(deltas):
            entry = self._token_entry(token_id, lp.logprob)
            entry["top_logprobs"] = [self._token_entry(t, v) for t, v in lp.top]
            content.append(entry)
        return {"content": content}

    def _token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _token_logprobs(deltas: Sequence[Delta]) -> list[tuple[int, TokenLogprob]]:
    return [
        pair for d in deltas if d.logprobs is not None for pair in zip(d.token_ids, d.logprobs, strict=True)
    ]


def token_namer(backend: Any) -> Callable[[int], str]:
    """How logprob entries spell a token: its text through the backend's tokenizer when it has one."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
        return lambda token_id: f"token_id:{token_id}"
    return lambda token_id: tokenizer.decode([token_id])
