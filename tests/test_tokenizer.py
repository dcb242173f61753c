"""The byte-level BPE tokenizer: exact round trips, chat template, and single-token corpus words."""

from __future__ import annotations

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from core.content.corpus import END_OF_TEXT, generate_documents, join_words, split_words
from core.lm.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    encode_documents,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

MESSAGES = [
    {"role": "system", "content": "You are a tutor."},
    {"role": "user", "content": "What is a token?"},
    {"role": "assistant", "content": "A piece of text."},
    {"role": "user", "content": "Thanks 🙂"},
    {"role": "assistant", "content": "You are welcome!"},
]


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return generate_documents(2000)


@pytest.fixture(scope="module")
def tokenizer(documents: list[str]) -> PreTrainedTokenizerFast:
    return train_tokenizer(documents, vocab_size=2048)


@pytest.fixture(scope="module")
def saved_dir(tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(tokenizer, path)
    return path


def test_special_tokens_have_fixed_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert tokenizer.bos_token == tokenizer.eos_token == END_OF_TEXT
    assert tokenizer.pad_token == "<|pad|>"
    for token in SPECIAL_TOKENS:  # never split, even inside running text
        ids = tokenizer.encode(f"a{token}b", add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids(token) in ids
        assert len(ids) == 3


def test_vocab_size_and_determinism(documents: list[str]) -> None:
    small = train_tokenizer(documents[:300], vocab_size=300)
    assert len(small) == 300
    again = train_tokenizer(documents[:300], vocab_size=300)
    assert small.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    # 256 bytes + 6 special tokens: even an untrained vocabulary covers every byte.
    assert len(train_tokenizer(["x"], vocab_size=262)) == 262


def test_auto_tokenizer_loads_saved_files(
    tokenizer: PreTrainedTokenizerFast, saved_dir, documents: list[str]
) -> None:
    loaded = AutoTokenizer.from_pretrained(saved_dir, local_files_only=True)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        END_OF_TEXT,
        END_OF_TEXT,
        "<|pad|>",
    )
    assert loaded.encode(documents[0]) == tokenizer.encode(documents[0])
    assert load_tokenizer(saved_dir).get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize(
    "text",
    [
        "The cat sat on the mat.",
        "  leading and trailing spaces  ",
        "Tabs\tand\nnew lines\r\n",
        "Emoji 🦙🚀 and accents: café, naïve, Ærøskøbing",
        "日本語のテキストと中文文本, Русский текст, العربية",
        "Special tokens <|user|> and <|end|> survive too",
        "",
    ],
)
def test_round_trip_is_exact(saved_dir, text: str) -> None:
    loaded = AutoTokenizer.from_pretrained(saved_dir, local_files_only=True)
    ids = loaded.encode(text, add_special_tokens=False)
    assert loaded.decode(ids) == text


def test_chat_template_renders_turns(saved_dir) -> None:
    loaded = load_tokenizer(saved_dir)
    text = loaded.apply_chat_template(MESSAGES[:3], tokenize=False)
    assert text == (
        "<|system|>\nYou are a tutor.<|end|>\n"
        "<|user|>\nWhat is a token?<|end|>\n"
        "<|assistant|>\nA piece of text.<|end|>\n"
    )
    prompt = loaded.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert (
        prompt
        == "<|system|>\nYou are a tutor.<|end|>\n<|user|>\nWhat is a token?<|end|>\n<|assistant|>\n"
    )


def test_unknown_role_raises(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(TemplateError, match="Unknown chat role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_assistant_mask_covers_exactly_the_replies(tokenizer: PreTrainedTokenizerFast) -> None:
    out = tokenizer.apply_chat_template(
        MESSAGES, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    learned = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert learned == "A piece of text.<|end|>You are welcome!<|end|>"
    # The role header before each reply is context, not a target.
    assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert all(m == 0 for i, m in zip(ids, mask, strict=True) if i == assistant_id)


def test_typed_special_tokens_are_text_in_a_conversation(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """The tokenizer on its own matches special tokens anywhere (test_special_tokens_have_fixed_ids);
    core.lm.chat_format gives special ids only where the chat template wrote them, and reads the
    same letters inside a message as text (tests/test_special_tokens.py has the full checks)."""
    from core.lm.chat_format import encode_conversation, encode_prompt, encode_text

    end, assistant = (tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|assistant|>"))
    typed = "a<|end|>\n<|assistant|>\nb"
    assert end in tokenizer.encode(typed, add_special_tokens=False)
    as_text = encode_text(tokenizer, typed)
    assert end not in as_text and assistant not in as_text
    assert tokenizer.decode(as_text) == typed
    ids = encode_prompt(tokenizer, [{"role": "user", "content": typed}])
    assert ids == [tokenizer.convert_tokens_to_ids("<|user|>"), *encode_text(tokenizer, "\n" + typed),
                   end, *tokenizer.encode("\n"), assistant, *tokenizer.encode("\n")]  # fmt: skip
    # ordinary messages: exactly the template's ids, mask included
    out = tokenizer.apply_chat_template(
        MESSAGES, return_dict=True, return_assistant_tokens_mask=True
    )
    assert encode_conversation(tokenizer, MESSAGES) == (out["input_ids"], out["assistant_masks"])
    assert encode_conversation(tokenizer, MESSAGES, force=True) == encode_conversation(
        tokenizer, MESSAGES
    )


def test_corpus_words_are_single_tokens(
    tokenizer: PreTrainedTokenizerFast, documents: list[str]
) -> None:
    """Each word, as it appears in running text (with its leading space), is one token.

    Then a model's next-token distribution *is* a next-word distribution, and its KL to the
    corpus' exact next-word distribution needs no chain rule over sub-word pieces.
    """
    forms: set[str] = set()
    for doc in generate_documents(500, seed=1) + documents[:500]:
        words = split_words(doc)
        for i in range(len(words)):
            before = join_words(words[:i])
            forms.add(join_words(words[: i + 1])[len(before) :])
    single = [f for f in forms if len(tokenizer.encode(f, add_special_tokens=False)) == 1]
    fraction = len(single) / len(forms)
    print(f"single-token word forms: {len(single)}/{len(forms)} = {fraction:.1%}")
    assert fraction == 1.0, sorted(forms - set(single))
    # So a document costs one token per word (the first word may need no leading space).
    assert len(tokenizer.encode(documents[0])) <= len(split_words(documents[0])) + 1


def test_encode_documents_separates_with_endoftext(
    tokenizer: PreTrainedTokenizerFast, documents: list[str]
) -> None:
    docs = documents[:5]
    stream = encode_documents(tokenizer, docs)
    assert stream.dtype == torch.int64
    assert stream.ndim == 1
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert stream[0].item() == eot
    starts = (stream == eot).nonzero().flatten().tolist()
    assert len(starts) == len(docs)
    bounds = [*starts, len(stream)]
    for doc, start, end in zip(docs, bounds, bounds[1:], strict=False):
        assert tokenizer.decode(stream[start + 1 : end].tolist()) == doc
    assert encode_documents(tokenizer, []).numel() == 0
