"""Turning a conversation into token ids and a mask of the tokens the loss is computed on.

The model's own chat template renders the text (a model fine-tuned in one format and prompted in
another answers badly). Which characters are the assistant's is found by rendering prefixes: the
text of turns 0..i with a generation prompt, then with assistant turn i added; what the second adds
is the answer, end-of-turn marker included (trailing layout whitespace not), so the model also learns when to stop. This works for
any template that renders a conversation as the concatenation of its turns, with or without
`{% generation %}` markers.
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass

from core.lm.chat_format import (
    DEFAULT_CHAT_TEMPLATE,
    RenderError,
    has_control_text,
    tokenize_conversation,
)
from core.lm.chat_format import ensure_chat_template as _ensure_chat_template
from core.lm.chat_format import render as _render
from core.train.config import ConfigError

# The template a tokenizer without one gets, and how a template is given, live in core.lm.chat_format
# (one chat format for generation, chat and training); this module adds the training view.
# Special-token letters inside a message are text here too (core.lm.chat_format's rule), so a
# model is trained on exactly the ids it is served.
__all__ = ["DEFAULT_CHAT_TEMPLATE", "Encoded", "RenderError", "encode", "ensure_chat_template"]

# Conversations a working template renders (at least one of them, to something): a template
# that raises on all, or renders all to nothing, is broken, not the data.
_PROBES = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ],
    [{"role": "user", "content": "Hi"}],
)


def ensure_chat_template(tokenizer, template: str | None = None) -> str:
    """core.lm.chat_format.ensure_chat_template (a user's template file wins over the model's),
    then the template is tried on a few plain conversations: one that raises on all of them or
    renders them to nothing is a ConfigError naming the template, before any row is judged
    (instead of every row of the data reported invalid)."""
    source = _ensure_chat_template(tokenizer, template)
    check_chat_template(tokenizer, source)
    return source


def check_chat_template(tokenizer, source: str) -> None:
    """Raise ConfigError when the tokenizer's chat template cannot render a plain conversation.
    source: where the template came from ("model", "default" or the --chat-template file)."""
    named = {
        "model": "the model's own chat template",
        "default": "the default chat template",
    }.get(source, f"chat_template: {source} (--chat-template)")
    problems = []
    for probe in _PROBES:
        try:
            text = _render(tokenizer, probe)
        except Exception as e:  # a template can raise anything: each is its own fault
            problems.append(f"{type(e).__name__}: {e}")
            continue
        if text.strip():
            return
        problems.append("it renders nothing")
    raise ConfigError(
        f"{named} cannot render a conversation ({problems[0]}); the data was not checked. "
        + (
            "Fix the template file, or leave out --chat-template to use the model's own."
            if source not in ("model", "default")
            else "Pass a working template with --chat-template."
        )
    )


@dataclass
class Encoded:
    """One row's token ids and loss mask, stored compactly: int32 ids (4 bytes a token, where a
    list of Python ints costs ~36) and one byte per mask entry, so a file of a few hundred thousand
    rows fits in a few hundred MB. Sequences of ints: index, slice, iterate, len, list()."""

    input_ids: array
    trained: bytes  # 1 where the token is a target of the loss

    def __post_init__(self) -> None:
        if not isinstance(self.input_ids, array):
            self.input_ids = array("i", self.input_ids)
        if not isinstance(self.trained, bytes):
            self.trained = bytes(bytearray(map(bool, self.trained)))
        if len(self.input_ids) != len(self.trained):
            raise ValueError(f"{len(self.input_ids)} ids but {len(self.trained)} mask entries")

    @property
    def num_trained(self) -> int:
        return sum(self.trained)

    def labels(self) -> list[int]:
        return [t if keep else -100 for t, keep in zip(self.input_ids, self.trained, strict=True)]


def _plain(messages: list[dict]) -> list[dict]:
    """The messages as the chat template sees them: our `weight` mark is not for the template."""
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def trained_spans(
    tokenizer, messages: list[dict]
) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """The rendered text, the character spans of the answers trained on, and those of the
    answers that are context only (`"weight": 0`, OpenAI's per-message weight).

    core.lm.chat_format.encode_conversation's {% generation %} mask marks every answer alike, so
    the weights are applied here, on the spans each answer renders to."""
    plain = _plain(messages)
    text = _render(tokenizer, plain)
    spans, context = [], []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, plain[:i], generation_prompt=True) if i else ""
        # The whole conversation up to its last turn is `text`: one render fewer for the
        # common single-answer row (the template is most of the check's time on large files).
        upto = text if i == last else _render(tokenizer, plain[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise RenderError(
                "the chat template does not render turn by turn (a prefix of the conversation "
                "renders differently), so the answers cannot be located; pass --chat-template"
            )
        end = len(upto)
        while end > len(before) and upto[end - 1].isspace():
            end -= 1  # the newline after the end-of-turn marker is layout, not the answer
        (context if message.get("weight") == 0 else spans).append((len(before), end))
    return text, spans, context


def _mask(
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    context: list[tuple[int, int]],
    train_on_prompt: bool,
) -> list[bool]:
    """Per token (its start offset): inside a trained answer (or anywhere with train_on_prompt)
    and not inside a weight-0 answer. Spans do not overlap and come in order: one bisect each."""

    def inside(found: list[tuple[int, int]]) -> list[bool]:
        starts = [lo for lo, _ in found]
        out = []
        for start, _ in offsets:
            k = bisect.bisect_right(starts, start) - 1
            out.append(k >= 0 and start < found[k][1])
        return out

    trained = [True] * len(offsets) if train_on_prompt else inside(spans)
    if context:
        trained = [t and not c for t, c in zip(trained, inside(context), strict=True)]
    return trained


def _encode_text(tokenizer, text: str) -> Encoded:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]  # a document starts after BOS, as in pre-training
    if eos is not None:
        ids = [*ids, eos]  # ... and ends with EOS, so the model learns to stop
    return Encoded(ids, [True] * len(ids))


def encode(tokenizer, conversation: list[dict] | str, train_on_prompt: bool = False) -> Encoded:
    """Token ids and loss mask of one row (a conversation, or plain text for the text format).
    train_on_prompt trains on every token except answers with weight 0 (context by request)."""
    result = encode_many(tokenizer, [conversation], train_on_prompt)[0]
    if isinstance(result, RenderError):
        raise result
    return result


def encode_many(
    tokenizer, conversations: list[list[dict] | str], train_on_prompt: bool = False
) -> list[Encoded | RenderError]:
    """encode() of many rows, the texts tokenized in one call (one Rust call per batch instead of
    one Python round trip per row). A row whose template cannot be located gets its
    RenderError in its place instead of stopping the others."""
    results: list[Encoded | RenderError | None] = [None] * len(conversations)
    texts, located = [], []  # the rendered chat rows, and (row, spans, context) of each
    for n, conversation in enumerate(conversations):
        if isinstance(conversation, str):
            results[n] = _encode_text(tokenizer, conversation)
            continue
        try:
            text, spans, context = trained_spans(tokenizer, conversation)
            if has_control_text(tokenizer, _plain(conversation)):
                # Special-token letters in a message: encoded as text, one row at a time.
                ids, offsets = _tokenize_as_served(tokenizer, conversation, text)
                results[n] = Encoded(ids, _mask(offsets, spans, context, train_on_prompt))
                continue
        except RenderError as e:
            results[n] = e
            continue
        texts.append(text)
        located.append((n, spans, context))
    for (n, spans, context), (ids, offsets) in zip(
        located, _tokenize(tokenizer, texts), strict=True
    ):
        results[n] = Encoded(ids, _mask(offsets, spans, context, train_on_prompt))
    return results


def _tokenize_as_served(
    tokenizer, conversation: list[dict], text: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets in `text`) of a conversation whose messages contain the letters of
    special tokens: only the template's own special tokens get special ids (as in chat)."""
    tokenized = tokenize_conversation(tokenizer, _plain(conversation))
    if tokenized.text != text or tokenized.offsets is None:
        raise RenderError(
            "a message contains special-token text and the chat template changes message text "
            "(or the tokenizer gives no offsets), so the answers cannot be located"
        )
    return tokenized.ids, tokenized.offsets


def _tokenize(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, no special tokens added (the template wrote them).
    A fast tokenizer's Rust backend directly: transformers' wrapper around the same call spends
    more time converting the results than the backend spends tokenizing."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        (list(i), list(o)) for i, o in zip(batch["input_ids"], batch["offset_mapping"], strict=True)
    ]


def held_out_prompt(
    tokenizer, conversation: list[dict] | str, prompt_tokens: int = 16
) -> tuple[str, str]:
    """(prompt, reference answer) of a row: the rendered conversation up to its last answer with
    the generation prompt, and that answer (plain text: its first `prompt_tokens` tokens and the
    rest)."""
    if isinstance(conversation, str):
        ids = list(encode(tokenizer, conversation).input_ids)
        rest = tokenizer.decode(ids[prompt_tokens:], skip_special_tokens=True)
        return tokenizer.decode(ids[:prompt_tokens]), rest
    prompt = _render(tokenizer, _plain(conversation[:-1]), generation_prompt=True)
    return prompt, conversation[-1]["content"]


def preview(tokenizer, encoded: Encoded, color: bool = False) -> str:
    """The rendered example with the trained tokens marked: «like this» (or in green on a
    terminal)."""
    on, off = ("\x1b[1;32m", "\x1b[0m") if color else ("«", "»")
    out, run = [], []
    # Decode runs of tokens with the same mask together (a lone byte-level token may be half a
    # UTF-8 character).
    for i, keep in enumerate(encoded.trained):
        run.append(int(encoded.input_ids[i]))
        if i + 1 == len(encoded.trained) or encoded.trained[i + 1] != keep:
            piece = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{on}{piece}{off}" if keep else piece)
            run = []
    return "".join(out)
