"""The conversational chain (LCEL): system prompt (+ retrieved notes) + trimmed history + the user's
message -> chat model.

Everything must fit the model's context window, counted in the model's own tokens. The tutor reads
only 128 tokens, so the budget is spent in order of importance: the new message (must fit),
room for the answer, the system prompt, retrieved notes, then as much recent history as fits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, trim_messages
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

# The system prompt of the tutor's multi-turn training chats (core/content/tutor_data.py).
DEFAULT_SYSTEM_PROMPT = "You are a kind tutor."
# The demo bot's (chat/bot.py; its adapter is trained with it), and the default for other models.
BOT_SYSTEM_PROMPT = (
    "You are the genai-lab tutor. Answer questions about generative AI in one to three short "
    "sentences, using the notes when they help. If a question is not about AI, say so."
)
TUTOR_NAMES = ("tutor", "tutor-sft", "tutor-rlhf", "tutor-base")


def default_system_prompt(spec: str) -> str:
    """The system prompt a model was trained with: the tutor's own, else the bot's."""
    return DEFAULT_SYSTEM_PROMPT if spec in TUTOR_NAMES else BOT_SYSTEM_PROMPT


NOTES_HEADER = "Notes:"
# Where retrieved notes go: "prompt" (the model reads them), "cite" (only cited under the answer)
# or "auto": the prompt for models that read at least NOTES_MIN_CONTEXT tokens. Measured with
# chat/bench.py on a tutor fine-tuned with core/train/stages/sft.py's defaults: the 128-token model, never
# trained with notes, gets the key term of held-out questions right 97% of the time without them
# and 79% with them, so for it they are cited only.
# The bot's refusal. An answer counts as an abstention when it contains ABSTAIN_MARKER (the
# adapter is trained to say it when the notes do not cover a question).
ABSTAIN_MARKER = "I only know about generative AI"
ABSTAIN_ANSWER = f"{ABSTAIN_MARKER} and the ideas this lab teaches, so I can't answer that."
GROUNDING_MODES = ("auto", "prompt", "cite")
NOTES_MIN_CONTEXT = 512

PROMPT = ChatPromptTemplate.from_messages(
    [
        MessagesPlaceholder("system", optional=True),
        MessagesPlaceholder("history"),
        ("human", "{question}"),
    ]
)


class ContextOverflowError(ValueError):
    """The message (or the system prompt) alone does not fit the model's context window."""


def notes_in_prompt(grounding: str, context_window: int) -> bool:
    if grounding not in GROUNDING_MODES:
        raise ValueError(
            f"unknown grounding {grounding!r} (choose from {', '.join(GROUNDING_MODES)})"
        )
    return grounding == "prompt" or (grounding == "auto" and context_window >= NOTES_MIN_CONTEXT)


def answer_budget(context_window: int, max_tokens: int | None = None) -> int:
    """Tokens kept free for the answer: `max_tokens` if given (at most half the window), else a
    third of the window (42 of the tutor's 128; its trained answers are up to ~40), at most 1024.
    Our own models may run on past it, up to the end of the window."""
    if max_tokens:
        return max(1, min(max_tokens, context_window // 2))
    return max(1, min(context_window // 3, 1024))


@dataclass
class FittedPrompt:
    """What goes into the prompt after budgeting, and what was left out."""

    system: list[SystemMessage]
    history: list[BaseMessage]
    question: str
    sources: list[dict] = field(default_factory=list)  # retrieved concepts: id, title, page,
    # score, in_prompt (whether their text fitted into the prompt)
    dropped_messages: int = 0  # oldest history messages that did not fit
    prompt_tokens: int = 0


def fit_prompt(
    question: str,
    history: list[BaseMessage],
    passages: list[Document],
    count_tokens: Callable[[list[BaseMessage]], int],
    context_window: int,
    answer_tokens: int,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    notes_in_prompt: bool = True,
) -> FittedPrompt:
    """Fit system prompt, notes, history and question into `context_window - answer_tokens`.
    With `notes_in_prompt=False` the passages are only cited, never shown to the model."""
    question = question.strip()
    if not question:
        raise ValueError("empty message: type something to send")
    limit = context_window - answer_tokens
    user = HumanMessage(question)
    own = count_tokens([user])
    if own > limit:
        raise ContextOverflowError(
            f"the message is {own} tokens; this model reads {context_window} tokens, "
            f"{answer_tokens} of them kept for the answer, so a message can be at most {limit}"
        )
    system = [SystemMessage(system_prompt)] if system_prompt.strip() else []
    needed = count_tokens([*system, user])
    if needed > limit:
        raise ContextOverflowError(
            f"the system prompt and message together are {needed} tokens, more than the "
            f"{limit} this model has for a prompt; shorten the system prompt"
        )
    # Notes get half of what is left when there is history to keep, all of it otherwise.
    notes_limit = needed + (limit - needed) // (2 if history else 1)
    system, sources = _add_notes(
        system_prompt, passages if notes_in_prompt else [], user, count_tokens, notes_limit
    )
    if not notes_in_prompt:
        sources = [_source(doc, in_prompt=False) for doc in passages]
    everything = [*system, *history, user]
    # trim_messages counts the messages it keeps newest-first; chat templates expect them in
    # conversation order, so the counter puts them back in order before rendering.
    position = {id(m): i for i, m in enumerate(everything)}

    def count_in_order(messages: list[BaseMessage]) -> int:
        return count_tokens(sorted(messages, key=lambda m: position.get(id(m), -1)))

    kept = trim_messages(
        everything,
        max_tokens=limit,
        token_counter=count_in_order,
        strategy="last",
        include_system=True,
        start_on="human",  # never start the history with a dangling answer
        allow_partial=False,
    )
    kept_history = kept[len(system) : -1]
    # trim_messages adds up the system prompt and the rest counted apart; check the whole.
    while kept_history and count_tokens([*system, *kept_history, user]) > limit:
        kept_history = kept_history[2:] if len(kept_history) > 1 else []
    return FittedPrompt(
        system=system,
        history=kept_history,
        question=question,
        sources=sources,
        dropped_messages=len(history) - len(kept_history),
        prompt_tokens=count_tokens([*system, *kept_history, user]),
    )


def _add_notes(system_prompt, passages, user, count_tokens, limit):
    """System message with as many notes as fit under `limit` tokens (system + question).

    A note that does not fit whole is cut after its last sentence that fits; if not even its
    first sentence fits (the tutor's 128 tokens), the first note is cut after its last word that
    fits. Every retrieved concept is returned as a source, `in_prompt` saying whether any of its
    text reached the model (a small model still answers from its weights; the page is cited).
    """
    lines: list[str] = []
    sources = [_source(doc, in_prompt=False) for doc in passages]

    def system_with(extra: list[str]) -> list[SystemMessage]:
        parts = [system_prompt.strip()] if system_prompt.strip() else []
        if extra:
            parts.append("\n".join([NOTES_HEADER, *extra]))
        return [SystemMessage("\n\n".join(parts))] if parts else []

    def fits(line: str) -> bool:
        return count_tokens([*system_with([*lines, line]), user]) <= limit

    for doc, source in zip(passages, sources, strict=True):
        label = f"[{doc.metadata.get('title', '')}] "
        sentences = re.split(r"(?<=[.!?])\s+", doc.metadata.get("text", doc.page_content))
        candidates = [label + " ".join(sentences[:n]) for n in range(len(sentences), 0, -1)]
        line = next((c for c in candidates if fits(c)), None)
        if line is None and not lines:
            words = sentences[0].split()
            cuts = [label + " ".join(words[:n]) + " ..." for n in range(len(words) - 1, 4, -1)]
            line = next((c for c in cuts if fits(c)), None)
        if line is None:
            break  # no room left: later, less relevant notes will not fit either
        lines.append(line)
        source["in_prompt"] = True
    return system_with(lines), sources


def _source(doc: Document, in_prompt: bool) -> dict:
    return {
        **{k: doc.metadata.get(k) for k in ("id", "title", "page", "score")},
        "in_prompt": in_prompt,
    }


def build_chain(
    chat_model: Runnable,
    count_tokens: Callable[[list[BaseMessage]], int],
    context_window: int,
    answer_tokens: int,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    notes_in_prompt: bool = True,
) -> Runnable:
    """LCEL: {"question", "history", "passages"} -> {"fitted": FittedPrompt, "answer": AIMessage}.

    `.stream()` yields {"fitted": ...} first, then {"answer": AIMessageChunk} pieces."""

    def fit(inputs: dict) -> dict:
        fitted = fit_prompt(
            inputs["question"],
            inputs.get("history", []),
            inputs.get("passages", []),
            count_tokens,
            context_window,
            answer_tokens,
            system_prompt,
            notes_in_prompt,
        )
        return {
            "fitted": fitted,
            "system": fitted.system,
            "history": fitted.history,
            "question": fitted.question,
        }

    return RunnableLambda(fit, name="fit_to_context") | RunnablePassthrough.assign(
        answer=PROMPT | chat_model
    )
