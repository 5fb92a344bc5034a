"""Render a model's Jinja chat template over a list of chat messages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import CorruptCheckpointError, InvalidChatMessagesError


def _raise_exception(message: str) -> NoReturn:
    # Templates call this to reject a conversation, e.g. "roles must alternate user/assistant".
    raise InvalidChatMessagesError(f"the chat template rejected the messages: {message}")


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Unlike jinja's built-in filter: no HTML escaping, non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
)
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
_ENV.filters["tojson"] = _tojson


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise CorruptCheckpointError(
            f"the chat template is not valid Jinja: line {exc.lineno}: {exc}"
        ) from exc


def validate_messages(messages: Any) -> None:
    """Raise InvalidChatMessagesError unless `messages` is a non-empty list of role/content str dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidChatMessagesError(
            f"chat messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidChatMessagesError(f"chat message {i} must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InvalidChatMessagesError(
                    f"chat message {i} needs a string {key!r}, got {type(message.get(key)).__name__}"
                )


def render_chat_template(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """The prompt text `template` makes of `messages`; `extra` reaches the template as more variables."""
    validate_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except jinja2.TemplateError as exc:
        raise InvalidChatMessagesError(f"the chat template failed on these messages: {exc}") from exc
