"""The one chat format: how a prompt or a conversation becomes token ids, where an answer ends,
and how examples are padded into batches. Every model goes through here: our tutor, a
transformers model with or without an adapter, in generation, chat, evaluation and training.

The model's own chat template renders the text (a model prompted in another format than it was
trained in answers badly). A tokenizer without one (a base model) gets DEFAULT_CHAT_TEMPLATE,
documented in the README:
    ### User:\\n{content}\\n\\n### Assistant:\\n{content}{eos}\\n\\n   (system turns: "### System:")
"""

from __future__ import annotations

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
        # The template writes every special token itself, so the tokenizer must add none.
        return list(tokenizer.encode(render(tokenizer, messages, True), add_special_tokens=False))
    if not isinstance(prompt, str):
        raise ValueError("a plain-text prompt must be a string")
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None else ids


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


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask (1 = trained on), from a template with {% generation %}
    marks (the tutor's; finetune.render finds answers in any template)."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def encode_answer(tokenizer, prompt: str | list[dict], response: str) -> list[int]:
    """Chat prompt + answer tokens + end of turn: exactly what a chat model emits."""
    answer_ids = tokenizer.encode(response, add_special_tokens=False)
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
