"""Tokenizer, chat template and incremental detokenizer, checked against transformers on the embedded GGUF."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from engine.chat_template import _compile, render_chat_template
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import (
    CorruptCheckpointError,
    InvalidChatMessagesError,
    InvalidPromptError,
    ModelNotFoundError,
    TokenizerUnavailableError,
    UnsupportedModelError,
)
from engine.loaders.gguf_file import read_gguf_metadata
from engine.tokenizer import DIGITS_THEN_GPT2, GGUF_PRE_TOKENIZER_SPLITS, Tokenizer, byte_spelling

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "x = 12345\nprint(x ** 2)  # 152399025",
    "def f(a, b):\n    return a+b\n\n\n",
    "multiple   spaces\tand\ttabs  \n\n  trailing   ",
    "  leading spaces",
    "a  1 b   22 c\n\n3",  # whitespace before a digit: where the 'smollm' split matters
    "emoji 🎉🚀 and CJK 你好世界，こんにちは",
    "héllo wörld — ½ ñ ß",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    "<|im_start|",
    "I'm sure they'll say it's fine, won't they?",
    "\u200b zero width and \r\n windows newlines",
    "",
]
MULTIBYTE = "héllo wörld — 你好世界 🎉🚀"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def meta(embedded_gguf_path):
    return read_gguf_metadata(embedded_gguf_path)


@pytest.fixture(scope="module")
def tok(meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def hf_tok(embedded_gguf_path):
    transformers = pytest.importorskip("transformers")
    path = embedded_gguf_path
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF loader does not know the "smollm" pre-tokenizer; give it SmolLM2's own
    # (tokenizer.json: each digit alone, then GPT-2's split) so vocabulary, merges and specials are
    # still checked independently. The split itself is pinned by test_smollm_isolates_digits.
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return hf


# ---- token ids against transformers ----


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_ids_match_transformers_on_random_text(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text)


def test_special_tokens_are_whole_and_flagged(tok, hf_tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<|im_start|>", "<|im_end|>"]
    assert tok.is_special(1) and tok.is_special(2) and not tok.is_special(ids[1])
    assert {i for i in range(tok.vocab_size) if tok.is_special(i)} == set(hf_tok.all_special_ids) | set(
        range(17)
    )


def test_attributes(tok, hf_tok, meta):
    assert tok.vocab_size == len(meta["tokenizer.ggml.tokens"]) == len(hf_tok) == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id) == (1, 2)
    assert tok.add_bos is False
    assert tok.chat_template == meta["tokenizer.chat_template"]


def test_pre_tokenizer_table_agrees_with_transformers():
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
        if split != DIGITS_THEN_GPT2:
            assert mapping.GGUF_PRE_TOKENIZER_SPLITS.get(name) == split, name


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("a  1", ["a", "ĠĠ", "1"]),  # llama.cpp's "smollm" rule; GPT-2's split alone gives a,Ġ,Ġ,1
        ("x\n\n1", ["x", "ĊĊ", "1"]),
        ("year 2024", ["year", "Ġ", "2", "0", "2", "4"]),
    ],
)
def test_smollm_isolates_digits(tok, text, tokens):
    assert tok.convert_ids_to_tokens(tok.encode(text)) == tokens


def test_byte_spelling_is_gpt2s():
    spelling = byte_spelling()
    assert len(spelling) == 256 and set(spelling.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (spelling[ord(" ")], spelling[ord("\n")], spelling[ord("a")]) == ("Ġ", "Ċ", "a")


# ---- decoding ----


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text == hf_tok.decode(ids)
    without_specials = tok.decode(ids, skip_special_tokens=True)
    assert without_specials == hf_tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in without_specials


def test_bos_added_only_when_asked(meta):
    tok = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.add_bos_token": True})
    assert tok.encode("hi") == [tok.bos_token_id, *tok.encode("hi", add_special_tokens=False)]


def test_out_of_vocabulary_ids_are_rejected(tok):
    with pytest.raises(InvalidPromptError, match="49152"):
        tok.decode([5, 49152])
    with pytest.raises(InvalidPromptError):
        tok.convert_ids_to_tokens([-1])


# ---- chat template ----


def test_chat_template_matches_transformers(tok, hf_tok):
    ours = tok.apply_chat_template(FRANCE, add_generation_prompt=True)
    assert ours == hf_tok.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    chat = [{"role": "system", "content": "Be brief."}, *FRANCE, {"role": "assistant", "content": "Paris."}]
    ours = tok.apply_chat_template(chat, add_generation_prompt=False)
    assert ours == hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hi",
        None,
        ["hi"],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": 1, "content": "hi"}],
        [{"content": "hi"}],
    ],
)
def test_bad_chat_messages(tok, messages):
    with pytest.raises(InvalidChatMessagesError):
        tok.apply_chat_template(messages)


def test_template_helpers():
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{{ messages | tojson }}{{ bos_token }}{{ extra }}"
    )
    messages = [{"role": "user", "content": "<b>é</b>"}]
    out = render_chat_template(template, messages, bos_token="<s>", extra="!")
    assert out == json.dumps(messages, ensure_ascii=False) + "<s>!"
    with pytest.raises(InvalidChatMessagesError, match="first must be user"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}])
    assert _compile(template) is _compile(template)


def test_broken_template_is_a_checkpoint_error():
    with pytest.raises(CorruptCheckpointError, match="Jinja"):
        render_chat_template("{% for m in messages %}", FRANCE)


def test_no_chat_template(meta):
    tok = Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    with pytest.raises(TokenizerUnavailableError):
        tok.apply_chat_template(FRANCE)


# ---- incremental detokenization ----


def stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [det.add_token(i) for i in ids] + [det.flush()]


def test_incremental_multibyte(tok):
    ids = tok.encode(MULTIBYTE)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "expected tokens that split a character"
    det = IncrementalDetokenizer(tok, tok.encode(tok.apply_chat_template(FRANCE)))
    deltas = stream(det, ids)
    assert "".join(deltas) == det.text == tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30), st.text(max_size=10))
def test_incremental_equals_decode(tok, text, prompt):
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, tok.encode(prompt))
    deltas = stream(det, ids)
    assert "".join(deltas) == tok.decode(ids)
    if "\ufffd" not in tok.decode(
        ids
    ):  # the vocabulary lacks a few bytes (0x04, 0xF1, ...): encode drops them
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_skips_special_tokens(tok):
    ids = tok.encode("Paris.<|im_end|>\n<|im_start|>你好")
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(stream(det, ids)) == tok.decode(ids, skip_special_tokens=True) == "Paris.\n你好"


def test_incremental_flush_lets_out_a_cut_character(tok):
    ids = tok.encode("ok 🎉")
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    det = IncrementalDetokenizer(tok, [])
    streamed = "".join(det.add_token(i) for i in ids[:cut])
    assert "\ufffd" not in streamed
    assert streamed + det.flush() == tok.decode(ids[:cut])
    assert det.text.endswith("\ufffd")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0x80, 0xF4), max_size=40))
def test_incremental_invalid_bytes(tok, data):
    # Lone byte tokens: mostly invalid UTF-8, now and then a character.
    spelling = byte_spelling()
    ids = [i for b in data if (i := tok.backend.token_to_id(spelling[b])) is not None]
    det = IncrementalDetokenizer(tok, [])
    assert "".join(stream(det, ids)) == tok.decode(ids)
    assert len(det._window) <= 12


def test_incremental_window_stays_small(tok):
    ids = tok.encode("long output " * 300)
    det = IncrementalDetokenizer(tok, ids[:50])
    for i in ids:
        det.add_token(i)
        assert len(det._window) <= 8
    assert det.text == tok.decode(ids)


# ---- tokenizer directories ----


def test_save_and_load_round_trip(tok, hf_tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.add_bos) == (1, 2, False)
    assert loaded.chat_template == tok.chat_template
    assert loaded.apply_chat_template(FRANCE) == tok.apply_chat_template(FRANCE)
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).encode(TEXTS[9]) == tok.encode(TEXTS[9])


def test_config_variants(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": [{"name": "default", "template": "ignored"}, {"name": "tool_use", "template": "x"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained_dir(tmp_path).chat_template == "ignored"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.add_bos) == (1, 2, False)
    assert loaded.apply_chat_template(FRANCE) == FRANCE[0]["content"]


def test_missing_directory_and_files(tok, tmp_path):
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_pretrained_dir(tmp_path / "nope")
    with pytest.raises(TokenizerUnavailableError, match="tokenizer.json"):
        Tokenizer.from_pretrained_dir(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    assert Tokenizer.from_pretrained_dir(tmp_path).encode("hi") == tok.encode("hi")


@pytest.mark.parametrize(
    "file, content",
    [
        ("tokenizer.json", '{"version": "1.0", "model": {"type": "BPE", "vocab": '),
        ("tokenizer.json", "[]"),
        ("tokenizer_config.json", "{not json"),
        ("tokenizer_config.json", "[1, 2]"),
        ("tokenizer_config.json", '{"eos_token": "<|no such token|>"}'),
        ("tokenizer_config.json", '{"chat_template": 5}'),
    ],
)
def test_corrupt_files(tok, tmp_path, file, content):
    tok.save_pretrained(tmp_path)
    (tmp_path / file).write_text(content)
    with pytest.raises(CorruptCheckpointError):
        Tokenizer.from_pretrained_dir(tmp_path)


# ---- GGUF metadata we cannot use ----


@pytest.mark.parametrize(
    "change, error",
    [
        ({"tokenizer.ggml.model": "llama"}, UnsupportedModelError),
        ({"tokenizer.ggml.pre": "no-such-pre"}, UnsupportedModelError),
        ({"tokenizer.ggml.model": None}, TokenizerUnavailableError),
        ({"tokenizer.ggml.merges": None}, CorruptCheckpointError),
        ({"tokenizer.ggml.token_type": [1, 3]}, CorruptCheckpointError),
        ({"tokenizer.ggml.merges": ["Ġ t", "no such-merge"]}, CorruptCheckpointError),
        ({"tokenizer.ggml.eos_token_id": 10**6}, CorruptCheckpointError),
    ],
)
def test_bad_gguf_metadata(meta, change, error):
    bad = {k: v for k, v in {**meta, **change}.items() if v is not None}
    with pytest.raises(error):
        Tokenizer.from_gguf_metadata(bad)
