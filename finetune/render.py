"""Turning a conversation into token ids and a mask of the tokens the loss is computed on.

The model's own chat template renders the text (a model fine-tuned in one format and prompted in
another answers badly). Which characters are the assistant's is found by rendering prefixes: the
text of turns 0..i with a generation prompt, then with assistant turn i added; what the second adds
is the answer, end-of-turn marker included (trailing layout whitespace not), so the model also learns when to stop. This works for
any template that renders a conversation as the concatenation of its turns, with or without
`{% generation %}` markers.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.chat_format import DEFAULT_CHAT_TEMPLATE, RenderError, ensure_chat_template
from core.chat_format import render as _render

# The template a tokenizer without one gets, and how a template is given, live in core.chat_format
# (one chat format for generation, chat and training); this module adds the training view.
__all__ = ["DEFAULT_CHAT_TEMPLATE", "Encoded", "RenderError", "encode", "ensure_chat_template"]


@dataclass
class Encoded:
    input_ids: list[int]
    trained: list[bool]  # True where the token is a target of the loss

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

    core.chat_format.encode_conversation's {% generation %} mask marks every answer alike, so
    the weights are applied here, on the spans each answer renders to."""
    plain = _plain(messages)
    text = _render(tokenizer, plain)
    spans, context = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, plain[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, plain[: i + 1])
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


def encode(tokenizer, conversation: list[dict] | str, train_on_prompt: bool = False) -> Encoded:
    """Token ids and loss mask of one row (a conversation, or plain text for the text format).
    train_on_prompt trains on every token except answers with weight 0 (context by request)."""
    if isinstance(conversation, str):
        ids = tokenizer(conversation, add_special_tokens=True)["input_ids"]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]  # a document starts after BOS, as in pre-training
        if eos is not None:
            ids = [*ids, eos]  # ... and ends with EOS, so the model learns to stop
        return Encoded(ids, [True] * len(ids))
    text, spans, context = trained_spans(tokenizer, conversation)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)

    def inside(start: int, found: list[tuple[int, int]]) -> bool:
        return any(lo <= start < hi for lo, hi in found)

    trained = [
        not inside(start, context) and (train_on_prompt or inside(start, spans))
        for start, _ in enc["offset_mapping"]
    ]
    return Encoded(list(enc["input_ids"]), trained)


def held_out_prompt(
    tokenizer, conversation: list[dict] | str, prompt_tokens: int = 16
) -> tuple[str, str]:
    """(prompt, reference answer) of a row: the rendered conversation up to its last answer with
    the generation prompt, and that answer (plain text: its first `prompt_tokens` tokens and the
    rest)."""
    if isinstance(conversation, str):
        ids = encode(tokenizer, conversation).input_ids
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
        run.append(encoded.input_ids[i])
        if i + 1 == len(encoded.trained) or encoded.trained[i + 1] != keep:
            piece = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{on}{piece}{off}" if keep else piece)
            run = []
    return "".join(out)
