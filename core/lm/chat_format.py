"""The one chat format: how a prompt or a conversation becomes token ids, where an answer ends,
and how examples are padded into batches. Every model goes through here: our tutor, a
transformers model with or without an adapter, in generation, chat, evaluation and training.

The model's own chat template renders the text (a model prompted in another format than it was
trained in answers badly). A tokenizer without one (a base model) gets DEFAULT_CHAT_TEMPLATE,
documented in the README:
    ### User:\\n{content}\\n\\n### Assistant:\\n{content}{eos}\\n\\n   (system turns: "### System:")

Only the template writes special tokens: the letters of one inside a message (`<|end|>` typed by a
user, in a tool's output or a retrieved page) are encoded as ordinary text pieces, so a message
cannot close its turn or forge another (tokenize_conversation; training rows follow the same rule).
A conversation without such letters keeps exactly the ids the template's tokenization gives.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from jinja2 import TemplateError

IGNORE = -100  # label of positions without loss (cross_entropy's ignore_index)

DEFAULT_CHAT_TEMPLATE = (
    "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '### ' + message['role'] | capitalize + ':\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] -}}{%- endif -%}"
    "{{- '\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Assistant:\\n' -}}{%- endif -%}"
)


class RenderError(ValueError):
    """A conversation the chat template cannot render (or not as a sequence of turns)."""


def ensure_chat_template(tokenizer, template: str | None = None) -> str:
    """Give the tokenizer a chat template; returns where it came from ("model", "default", or
    the file it was read from). A user's template file wins over the model's."""
    if template:
        from pathlib import Path

        tokenizer.chat_template = Path(template).read_text(encoding="utf-8")
        return template
    if getattr(tokenizer, "chat_template", None):
        return "model"
    if tokenizer.eos_token is None:
        raise RenderError("the tokenizer has no chat template and no eos token to end answers with")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default"


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as e:
        raise RenderError(f"chat template: {e}") from None


def as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool = True) -> list[int]:
    """Token ids a model continues from. chat: a question (or a conversation) rendered by the
    chat template, ending with the assistant's header, ready for the answer. Not chat: plain text
    after BOS, as a document starts in pre-training."""
    if chat:
        messages = as_messages(prompt)
        if not messages:
            raise ValueError("no messages to answer")
        if has_control_text(
            tokenizer, messages
        ):  # special tokens only where the template wrote them
            return tokenize_conversation(tokenizer, messages, generation_prompt=True).ids
        # The template writes every special token itself, so the tokenizer must add none.
        return list(tokenizer.encode(render(tokenizer, messages, True), add_special_tokens=False))
    if not isinstance(prompt, str):
        raise ValueError("a plain-text prompt must be a string")
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None else ids


# ---------------------------------------------------------------------------------------------
# Special tokens in message text are text. The template writes each turn's special tokens
# (<|user|> ... <|end|>, <|im_start|> ... <|im_end|>) and only those get special-token ids; the
# same letters inside a message (typed by a user, returned by a tool, found in a retrieved page)
# are encoded as ordinary text pieces, so no message can open or close a turn.
#
# How: a conversation whose messages contain no special-token text is encoded exactly as before
# (the rendered string, tokenized). Otherwise each special token inside a message is swapped for
# a private marker before rendering, so every special token left in the rendered string is the
# template's own; those are swapped for stand-in added tokens, the markers back for the original
# letters, and the whole string is tokenized once by a copy of the tokenizer that reads special
# tokens as text and the stand-ins as the special ids. One tokenization of the whole string, so
# the text around a turn marker splits exactly as it would have (a prefix space, a merge).
# ---------------------------------------------------------------------------------------------

# Private-use characters (Unicode planes 15 and 16) for the markers: a lead character that occurs
# in no message, then one character per special token.
_LEADS = range(0x10FF00, 0x10FFFE)
_SUFFIX = 0xF0000  # + the special token's index (plane 15 holds 65,534)
# Per tokenizer (weakly: it goes when the tokenizer goes), per lead: the backend copy.
_TEXT_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The special tokens' texts (a template's turn markers, BOS/EOS, padding ...), longest
    first: inside a message these are encoded as text."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {t.content for t in decoder.values() if getattr(t, "special", False)}
    found.update(getattr(tokenizer, "all_special_tokens", ()) or ())
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


@lru_cache(maxsize=64)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")  # (?!) never matches


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings(value)


def has_control_text(tokenizer, messages: list[dict]) -> bool:
    """Whether any message (its content, or any other text field but the role) contains the
    letters of a special token."""
    pattern = _pattern(control_tokens(tokenizer))
    fields = ({k: v for k, v in m.items() if k != "role"} for m in messages)
    return any(pattern.search(s) for s in _strings(list(fields)))


def _free_chars(texts: list[str], n: int) -> list[str]:
    """n private-use characters that occur in none of the texts."""
    used = set().union(*(set(t) for t in texts)) if texts else set()
    free = [chr(c) for c in _LEADS if chr(c) not in used]
    if len(free) < n:
        raise RenderError("the messages use every private-use marker character")
    return free[:n]


def _text_backend(tokenizer, lead: str):
    """A copy of the tokenizer's Rust backend that encodes special tokens as text, plus one
    stand-in added token per special token (lead + a private character, same strip settings):
    (backend, {special token: stand-in}, {stand-in id: the special token's id}). Cached per
    tokenizer; a copy, so the shared tokenizer's settings never change under another thread."""
    backend = tokenizer.backend_tokenizer
    tokens = control_tokens(tokenizer)
    if len(tokens) >= 0xFFFE:
        raise RenderError(f"the tokenizer has {len(tokens):,} special tokens, too many to mark")
    # the same backend, vocabulary and special tokens as when the copy was made
    signature = (id(backend), backend.get_vocab_size(True), tokens)
    per_lead = _TEXT_BACKENDS.setdefault(tokenizer, {})
    cached = per_lead.get(lead)
    if cached is not None and cached[3] == signature:
        return cached[:3]
    from tokenizers import AddedToken, Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    copy.encode_special_tokens = True
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    flags = {t.content: t for t in decoder.values()}
    stand_in = {t: lead + chr(_SUFFIX + k) for k, t in enumerate(tokens)}
    added = []
    for token, text in stand_in.items():
        f = flags.get(token)
        added.append(
            AddedToken(
                text,
                single_word=getattr(f, "single_word", False),
                lstrip=getattr(f, "lstrip", False),
                rstrip=getattr(f, "rstrip", False),
                normalized=False,
                special=False,
            )
        )
    copy.add_tokens(added)
    ids = {copy.token_to_id(stand_in[t]): tokenizer.convert_tokens_to_ids(t) for t in tokens}
    per_lead[lead] = (copy, stand_in, ids, signature)
    return copy, stand_in, ids


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of `text` as plain text: the letters of a special token become ordinary pieces (an
    answer, a message's content). Text without them: exactly tokenizer.encode."""
    if not _pattern(control_tokens(tokenizer)).search(text):
        return list(tokenizer.encode(text, add_special_tokens=False))
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    lead = _free_chars([text], 2)[1]  # the lead tokenize_conversation picks (one cached copy)
    backend, _, _ = _text_backend(tokenizer, lead)
    return list(backend.encode(text, add_special_tokens=False).ids)


@dataclass
class Tokenized:
    """A rendered conversation: its text, token ids, and each token's (start, end) characters in
    the text (None for a tokenizer without offsets)."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]] | None


def _mark(obj, pattern: re.Pattern, markers: dict[str, str], role_key: bool = False):
    """The messages with every special token inside their text swapped for its marker."""
    if isinstance(obj, str):
        return pattern.sub(lambda m: markers[m.group(0)], obj)
    if isinstance(obj, dict):
        return {
            k: v if (role_key and k == "role") else _mark(v, pattern, markers)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_mark(v, pattern, markers, role_key) for v in obj]
    return obj


def _marked(tokenizer, messages: list[dict], force: bool = False):
    """(the messages with markers, {marker: special token}, the stand-ins' lead character), or
    None when no message contains special-token text (and not force)."""
    if not force and not has_control_text(tokenizer, messages):
        return None
    tokens = control_tokens(tokenizer)
    pattern = _pattern(tokens)
    chars = _free_chars(list(_strings(messages)), 2)
    markers = {t: chars[0] + chr(_SUFFIX + k) for k, t in enumerate(tokens)}
    marked = _mark(messages, pattern, markers, role_key=True)
    return marked, {m: t for t, m in markers.items()}, chars[1]


def tokenize_conversation(
    tokenizer, messages: list[dict], generation_prompt: bool = False, force: bool = False
) -> Tokenized:
    """The conversation rendered by the chat template and tokenized so that only the template's
    own special tokens get special ids: special-token letters inside any message are encoded as
    text. A conversation without such letters gets exactly tokenizer(render(...)) (force: take
    the other path anyway, for tests)."""
    found = _marked(tokenizer, messages, force)
    if found is None:
        text = render(tokenizer, messages, generation_prompt)
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            return Tokenized(text, list(tokenizer.encode(text, add_special_tokens=False)), None)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return Tokenized(text, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])
    marked, unmark, lead = found
    return _encode_marked(tokenizer, render(tokenizer, marked, generation_prompt), unmark, lead)[0]


def _encode_marked(
    tokenizer, rendered: str, unmark: dict[str, str], lead: str
) -> tuple[Tokenized, list[int]]:
    """Tokenize a string rendered from marked messages: the special tokens in it are the
    template's (special ids), the markers stand for the messages' letters (text). Also returns
    where each position of `rendered` falls in the text."""
    tokens = control_tokens(tokenizer)
    split = re.compile("|".join(map(re.escape, [*unmark, *tokens])))
    rust = getattr(tokenizer, "backend_tokenizer", None) is not None
    backend, stand_in, to_special = _text_backend(tokenizer, lead) if rust else (None, {}, {})
    # What the copy reads (template tokens -> stand-ins, markers -> the letters), the text that
    # stands for, and where each position of the first (to_text) and of `rendered` (from_marked)
    # falls in the text.
    pieces, text, to_text, from_marked = [], [], [0], [0]
    spans = []  # (start, end) in the text of each template token (no Rust backend only)

    def extend(where: list[int], length: int, end: int) -> None:
        """Positions 1..length of a piece ending at `end` in the text (inner ones: its start)."""
        start = where[-1]
        where.extend([start] * (length - 1) + [end] if length else [])

    last = 0
    for m in [*split.finditer(rendered), None]:
        plain = rendered[last : m.start() if m else len(rendered)]
        pieces.append(plain)
        text.append(plain)
        to_text.extend(range(to_text[-1] + 1, to_text[-1] + 1 + len(plain)))
        from_marked.extend(range(from_marked[-1] + 1, from_marked[-1] + 1 + len(plain)))
        if m is None:
            break
        found, end = m.group(0), from_marked[-1]
        original = unmark.get(found)
        if original is not None:  # a message's letters: the same text in both
            pieces.append(original)
            text.append(original)
            to_text.extend(range(to_text[-1] + 1, to_text[-1] + 1 + len(original)))
            extend(from_marked, len(found), end + len(original))
        else:  # the template's special token: read through its stand-in
            pieces.append(stand_in.get(found, found))
            text.append(found)
            spans.append((end, end + len(found)))
            extend(to_text, len(pieces[-1]), end + len(found))
            extend(from_marked, len(found), end + len(found))
        last = m.end()
    full = "".join(text)
    if rust:
        enc = backend.encode("".join(pieces), add_special_tokens=False)
        ids = [to_special.get(i, i) for i in enc.ids]
        offsets = [(to_text[s], to_text[e]) for s, e in enc.offsets]
        return Tokenized(full, ids, offsets), from_marked
    # A tokenizer without a Rust backend: the template's tokens by id, the text between them
    # encoded on its own with special tokens as text (no offsets).
    ids, cursor = [], 0
    for start, end in [*spans, (len(full), len(full))]:
        if start > cursor:
            gap = full[cursor:start]
            ids += tokenizer.encode(gap, add_special_tokens=False, split_special_tokens=True)
        if end > start:
            ids.append(tokenizer.convert_tokens_to_ids(full[start:end]))
        cursor = end
    return Tokenized(full, ids, None), from_marked


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an answer in the chat template (the tutor's <|end|>, <|im_end|>,
    <|eot_id|> ...), else EOS."""
    stops = template_stop_ids(tokenizer)
    return stops[0] if stops else tokenizer.eos_token_id


def template_stop_ids(tokenizer) -> list[int]:
    """The special token the chat template puts right after an assistant's content, found by
    rendering a marker answer (works for any template, no list of model families)."""
    marker = "\x00answer\x00"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = render(tokenizer, messages)
    except (RenderError, ValueError):
        return []
    start = text.find(marker)
    if start < 0:
        return []
    start += len(marker)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    after = [i for i, (s, _) in offsets if s >= start]
    return [after[0]] if after and after[0] in tokenizer.all_special_ids else []


def stop_ids(tokenizer, config=None) -> list[int]:
    """Ids that end an answer: the end-of-turn token of the chat template, EOS, and the model
    config's eos ids (a generation config may list several)."""
    ids = set(template_stop_ids(tokenizer))
    ids.add(tokenizer.eos_token_id)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def encode_conversation(
    tokenizer, messages: list[dict], force: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask (1 = trained on), from a template with {% generation %}
    marks (the tutor's; finetune.render finds answers in any template). Special-token letters in
    a message are text, as in encode_prompt (force: that path even without them, for tests)."""
    found = _marked(tokenizer, messages, force)
    if found is None:
        try:
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except TemplateError as e:
            raise RenderError(f"chat template: {e}") from None
        return list(out["input_ids"]), list(out["assistant_masks"])
    from transformers.utils.chat_template_utils import render_jinja_template

    marked, unmark, lead = found
    try:
        (rendered,), (generation,) = render_jinja_template(
            conversations=[marked],
            chat_template=tokenizer.get_chat_template(),
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
    except TemplateError as e:
        raise RenderError(f"chat template: {e}") from None
    tokenized, where = _encode_marked(tokenizer, rendered, unmark, lead)
    if tokenized.offsets is None:
        raise RenderError("an assistant mask needs a fast tokenizer (character offsets)")
    answers = [(where[s], where[e]) for s, e in generation]
    mask = [int(any(max(s, a) < min(e, b) for a, b in answers)) for s, e in tokenized.offsets]
    return tokenized.ids, mask


def encode_answer(tokenizer, prompt: str | list[dict], response: str) -> list[int]:
    """Chat prompt + answer tokens + end of turn: exactly what a chat model emits."""
    answer_ids = encode_text(tokenizer, response)  # its special-token letters are text
    return [*encode_prompt(tokenizer, prompt), *answer_ids, end_of_turn_id(tokenizer)]


def mask_view(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The rendered conversation with trained-on tokens in [brackets] (the SFT debug view)."""
    parts = []
    for token_id, m in zip(ids, mask, strict=True):
        piece = tokenizer.decode([token_id]).replace("\n", "\\n")
        parts.append(f"[{piece}]" if m else piece)
    return "".join(parts)


def pad_sequences(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad: ids [B, T] and lengths [B]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs])


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad (ids, labels) examples to the longest: ids [B, T] (pad_id), labels [B, T]
    (IGNORE)."""
    ids, _ = pad_sequences([x for x, _ in examples], pad_id)
    labels, _ = pad_sequences([y for _, y in examples], IGNORE)
    return ids, labels
