"""Turn a stream of generated token ids into a stream of text deltas."""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

# Prompt tokens decoded ahead of the first generated one, so decoders that drop a leading space
# (SentencePiece) see the same context as when decoding everything.
_PROMPT_CONTEXT = 5
# A character being spelled out is held back; a tail still undecodable after this many tokens holds
# invalid bytes, and the part of it no later token can change is let out as U+FFFD, as decode() does.
_MAX_HELD_TOKENS = 6


class IncrementalDetokenizer:
    """Decodes one token at a time, emitting only finished characters.

    window: [ emitted by the last step | held back ]
                                       ^ read_offset
    Each step decodes the whole window and the part before read_offset and emits what the first
    adds to the second; the window then restarts at read_offset. The emitted part is context that
    keeps decoders which drop a leading space honest, and a step costs O(window), not O(output).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._read_offset = len(self._window)
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def add_token(self, token_id: int) -> str:
        """Append a generated token; return the text it completes ('' while a character is unfinished)."""
        self._window.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: return whatever is still held back, unfinished bytes as U+FFFD."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode, skip = self._tokenizer.decode, self._skip_special_tokens
        if len(self._window) == self._read_offset:
            return ""
        end = len(self._window)
        full = decode(self._window, skip)
        if not final and full.endswith("\ufffd"):
            if end - self._read_offset < _MAX_HELD_TOKENS:
                return ""
            end = self._last_stable_boundary(full)
            if end == self._read_offset:
                return ""
            full = decode(self._window[:end], skip)
        delta = full[len(decode(self._window[: self._read_offset], skip)) :]
        del self._window[: self._read_offset]
        self._read_offset = end - self._read_offset
        self._text += delta
        return delta

    def _last_stable_boundary(self, full: str) -> int:
        """The last held token boundary that cuts no character or invalid byte run in two, so that no
        later token can change the text before it; read_offset if there is none."""
        decode, skip = self._tokenizer.decode, self._skip_special_tokens
        for end in range(len(self._window) - 1, self._read_offset, -1):
            if decode(self._window[:end], skip) + decode(self._window[end:], skip) == full:
                return end
        return self._read_offset
