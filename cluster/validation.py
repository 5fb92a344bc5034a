"""The checks a request passes at the front end, before anything is routed: which model, one
prompt in one of three forms, the prompt turned into token ids within the context, and the
server's limits on sampling. Every failure is a PDServeError naming what to fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cluster.protocol import ModelCard, UnknownModelError
from engine.errors import (
    InvalidPromptError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    TokenizerUnavailableError,
)
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


class RequestValidator:
    def __init__(
        self, model: ModelCard, tokenizer: Tokenizer | None, vocab_size: int, max_tokens_limit: int
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = min(vocab_size, tokenizer.vocab_size) if tokenizer is not None else vocab_size
        self.max_tokens_limit = max_tokens_limit

    def prepare(
        self,
        model: str,
        params: SamplingParams,
        prompt: str | None = None,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        if model and model != self.model.id:
            raise UnknownModelError(
                f"model {model!r} is not served here; this cluster serves {self.model.id!r}"
            )
        given = [
            name
            for name, v in (("prompt", prompt), ("token_ids", token_ids), ("messages", messages))
            if v is not None
        ]
        if len(given) != 1:
            raise InvalidPromptError(
                f"give exactly one of prompt, token_ids or messages (got {', '.join(given) or 'none'})"
            )
        if params.max_tokens > self.max_tokens_limit:
            raise InvalidSamplingParamsError(
                f"max_tokens={params.max_tokens} is over this server's limit of {self.max_tokens_limit}"
            )
        if (params.stop or prompt is not None or messages is not None) and self.tokenizer is None:
            raise TokenizerUnavailableError(
                f"model {self.model.id!r} has no tokenizer: send token ids (and stop_token_ids, not stop)"
            )
        if messages is not None:
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidPromptError(f"prompt must be a string, got {type(prompt).__name__}")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self._check_ids(token_ids)
        if not ids:
            raise InvalidPromptError("the prompt is empty; give at least one token")
        if len(ids) >= self.model.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the context holds {self.model.max_model_len} "
                "(prompt plus at least one generated token); shorten the prompt"
            )
        return ids

    def _check_ids(self, token_ids: Any) -> list[int]:
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
            raise InvalidPromptError(f"token_ids must be a list of ints, got {type(token_ids).__name__}")
        ids = list(token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidPromptError("token_ids must be a list of ints")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidPromptError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return ids
