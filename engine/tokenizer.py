"""Text <-> token ids, built from a GGUF file's metadata or a Hugging Face tokenizer directory."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from engine.chat_template import render_chat_template
from engine.errors import (
    CorruptCheckpointError,
    InvalidPromptError,
    ModelNotFoundError,
    TokenizerUnavailableError,
    UnsupportedModelError,
)

# llama.cpp's token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4

# How text is split into words before BPE, by `tokenizer.ggml.pre`: None is GPT-2's own split, built
# into ByteLevel; DIGITS_THEN_GPT2 first isolates every digit, then applies GPT-2's split. That is
# SmolLM2's own tokenizer.json and llama.cpp's "smollm" rule ("a  1" -> 'a','ĠĠ','1'); transformers'
# GGUF loader does not know "smollm" and falls back to GPT-2's split ('a','Ġ','Ġ','1'), which gives
# the model token sequences it never saw in training, so we follow the model here.
DIGITS_THEN_GPT2 = "digits+gpt2"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt-2": None,
    "smollm": DIGITS_THEN_GPT2,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


def byte_spelling() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: printable Latin-1 as itself, the rest moved past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    spelling = {b: chr(b) for b in printable}
    unprintable = [b for b in range(256) if b not in spelling]
    spelling.update({b: chr(256 + n) for n, b in enumerate(unprintable)})
    return spelling


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: BOS/EOS, specials, chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        for name, token_id in (("bos", bos_token_id), ("eos", eos_token_id)):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise CorruptCheckpointError(f"{name} token id {token_id} is outside the vocabulary")
        if add_bos and bos_token_id is None:
            raise CorruptCheckpointError("the tokenizer asks to add a BOS token but names none")
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    # ---- construction ----

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file describes; only byte-level BPE (`tokenizer.ggml.model` 'gpt2')."""
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise TokenizerUnavailableError("the GGUF file holds no tokenizer (no tokenizer.ggml.model)")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"GGUF tokenizer type {kind!r} is not supported, only byte-level BPE ('gpt2'); "
                "load the model from a directory with a tokenizer.json instead"
            )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZER_SPLITS:
            raise UnsupportedModelError(
                f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(GGUF_PRE_TOKENIZER_SPLITS)}"
            )
        tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
        token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens or ())
        if not tokens or not merges or len(token_types) != len(tokens):
            raise CorruptCheckpointError(
                "GGUF tokenizer metadata is incomplete: byte-level BPE needs tokenizer.ggml.tokens, "
                "tokenizer.ggml.merges and one tokenizer.ggml.token_type per token"
            )

        # Tokens are stored in GPT-2's byte spelling; respell any that were written as plain text.
        spelling = byte_spelling()
        alphabet = set(spelling.values())
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        try:
            bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges])
        except Exception as exc:
            raise CorruptCheckpointError(f"GGUF BPE vocabulary and merges do not match: {exc}") from exc
        backend = tokenizers.Tokenizer(bpe)
        split = GGUF_PRE_TOKENIZER_SPLITS[pre]
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        elif split == DIGITS_THEN_GPT2:
            digits = pre_tokenizers.Digits(individual_digits=True)
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()

        # Control tokens (<|im_start|>) are matched whole in text and are special; user-defined ones
        # (<think>) are matched whole but are ordinary text. A "control" token spelled outside the byte
        # alphabet is a llama.cpp mislabel and is left alone, as transformers does.
        typed = list(zip(tokens, token_types, strict=True))
        control = [t for t, k in typed if k == CONTROL and set(t) <= alphabet]
        user_defined = [t for t, k in typed if k == USER_DEFINED and t in vocab]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and (if present) chat_template.jinja from `path`."""
        path = Path(path)
        if not path.is_dir():
            raise ModelNotFoundError(f"{path}: no such tokenizer directory")
        if not (path / "tokenizer.json").is_file():
            raise TokenizerUnavailableError(
                f"{path} has no tokenizer.json (only fast-tokenizer files are supported, not "
                "vocab.json/merges.txt or tokenizer.model alone)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:
            raise CorruptCheckpointError(f"{path / 'tokenizer.json'} is unreadable: {exc}") from exc
        config_file, jinja_file = path / "tokenizer_config.json", path / "chat_template.jinja"
        config = _read_json(config_file) if config_file.is_file() else {}

        def token_id(name: str) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):  # a serialised AddedToken
                token = token.get("content")
            if token is None:
                return None
            if not isinstance(token, str) or (token_id := backend.token_to_id(token)) is None:
                raise CorruptCheckpointError(f"{path}: {name} {token!r} is not in the vocabulary")
            return token_id

        bos_token_id = token_id("bos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # say nothing: add BOS when tokenizer.json's post-processor does
            add_bos = bos_token_id is not None and backend.encode("").ids[:1] == [bos_token_id]
        if jinja_file.is_file():
            chat_template = jinja_file.read_text()
        else:
            chat_template = _pick_template(config.get("chat_template"))
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_id=token_id("eos_token"),
            add_bos=bool(add_bos),
            chat_template=chat_template,
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, for `from_pretrained_dir` or transformers."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._token_or_none(self.bos_token_id),
            "eos_token": self._token_or_none(self.eos_token_id),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- use ----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (<|im_start|>) become their ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        self._check_ids(ids)
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        self._check_ids(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, rendered with this model's chat template."""
        if self.chat_template is None:
            raise TokenizerUnavailableError("this model has no chat template; send a plain prompt instead")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_or_none(self.bos_token_id) or "",
            eos_token=self._token_or_none(self.eos_token_id) or "",
        )

    def _token_or_none(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise InvalidPromptError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {'name', 'template'} with a 'default'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise CorruptCheckpointError(
        f"chat_template must be a string or a list holding a 'default': {value!r:.80}"
    )
