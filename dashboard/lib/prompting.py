"""Prompting & hallucination page logic (no Streamlit calls): a zero-shot vs few-shot sentiment
task with a fixed held-out set, and a made-up question to show a confident wrong answer next to
the grounded bot's retrieval score."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.lm.chat_format import encode_prompt, render, stop_ids
from core.lm.generate import GenerationStep, generate, generation_config, stream_steps
from core.lm.sampling import SamplingParams


@dataclass(frozen=True)
class Example:
    """A short review and its label ("positive" or "negative")."""

    text: str
    label: str


LABELS = ("positive", "negative")
INSTRUCTION = "Is this review positive or negative? Answer with one word.\n\nReview: {text}"

# The in-prompt examples (the "shots"), alternating labels so that any k is roughly balanced and
# the model cannot just copy the last label it saw.
SHOTS: tuple[Example, ...] = (
    Example("The soup was hot and tasty, and the staff were kind.", "positive"),
    Example("My phone stopped working after two days.", "negative"),
    Example("A lovely little hotel with a view of the sea.", "positive"),
    Example("The film was long, loud and boring.", "negative"),
)

# The held-out set the accuracy is measured on: written apart from SHOTS (no shared sentence),
# balanced, six of each label.
HELD_OUT: tuple[Example, ...] = (
    Example("I loved this book and read it in one night.", "positive"),
    Example("The delivery was late and the box was broken.", "negative"),
    Example("Great value for money, I would buy it again.", "positive"),
    Example("The shoes fell apart after a week.", "negative"),
    Example("The teacher explained everything clearly and patiently.", "positive"),
    Example("Terrible service: we waited an hour for cold food.", "negative"),
    Example("This game is fun to play with friends.", "positive"),
    Example("The app crashes every time I open it.", "negative"),
    Example("The garden was beautiful and full of flowers.", "positive"),
    Example("I regret buying this noisy vacuum cleaner.", "negative"),
    Example("Fast shipping and the jacket fits perfectly.", "positive"),
    Example("The room smelled bad and the bed was dirty.", "negative"),
)

MAX_SHOTS = len(SHOTS)


def user_message(text: str) -> str:
    return INSTRUCTION.format(text=text)


def build_messages(text: str, k: int, shots: Sequence[Example] = SHOTS) -> list[dict]:
    """The conversation asking for `text`'s label, after `k` solved examples as earlier chat
    turns (the chat template then shows them exactly as the model's own past answers)."""
    if not 0 <= k <= len(shots):
        raise ValueError(f"k must be between 0 and {len(shots)}, got {k}")
    messages: list[dict] = []
    for shot in shots[:k]:
        messages.append({"role": "user", "content": user_message(shot.text)})
        messages.append({"role": "assistant", "content": shot.label})
    messages.append({"role": "user", "content": user_message(text)})
    return messages


def parse_label(answer: str) -> str | None:
    """The label the answer gives: its first word if it is one of LABELS (case and punctuation
    ignored), else None (counted wrong: the task asked for one word)."""
    words = re.findall(r"[a-z]+", answer.lower())
    return words[0] if words and words[0] in LABELS else None


def lenient_label(answer: str) -> str | None:
    """The label the answer names anywhere ("This review is positive"), if it names exactly
    one: measures the judgement apart from following the one-word format."""
    named = {w for w in re.findall(r"[a-z]+", answer.lower()) if w in LABELS}
    return named.pop() if len(named) == 1 else None


@dataclass(frozen=True)
class Prediction:
    text: str
    gold: str
    answer: str  # the model's raw reply
    predicted: str | None

    @property
    def correct(self) -> bool:
        return self.predicted == self.gold

    @property
    def lenient(self) -> str | None:
        return lenient_label(self.answer)


@dataclass(frozen=True)
class Evaluation:
    k: int
    predictions: list[Prediction]

    @property
    def accuracy(self) -> float:
        return accuracy([p.predicted for p in self.predictions], [p.gold for p in self.predictions])

    @property
    def lenient_accuracy(self) -> float:
        """Accuracy when a sentence naming the right label also counts."""
        return accuracy([p.lenient for p in self.predictions], [p.gold for p in self.predictions])

    @property
    def answered_positive(self) -> int:
        """How many replies say "positive" (a model stuck on one label scores 50% here)."""
        return sum(p.lenient == "positive" for p in self.predictions)


def accuracy(predicted: Sequence[str | None], gold: Sequence[str]) -> float:
    """Fraction of exact matches (None never matches)."""
    if len(predicted) != len(gold):
        raise ValueError("predictions and labels differ in length")
    if not gold:
        return 0.0
    return sum(p is not None and p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


def evaluate(
    classify: Callable[[list[dict]], str],
    k: int,
    items: Sequence[Example] = HELD_OUT,
    shots: Sequence[Example] = SHOTS,
) -> Evaluation:
    """Ask `classify` (messages -> reply) about every held-out item with `k` shots."""
    predictions = []
    for item in items:
        reply = classify(build_messages(item.text, k, shots))
        predictions.append(Prediction(item.text, item.label, reply, parse_label(reply)))
    return Evaluation(k, predictions)


def model_classifier(model, tokenizer, max_new_tokens: int = 4) -> Callable[[list[dict]], str]:
    """Greedy replies from a chat model: a label task has one right answer, so sampling would
    only add noise (and make the accuracy change from run to run)."""
    stops = stop_ids(tokenizer, generation_config(model))

    def classify(messages: list[dict]) -> str:
        ids = encode_prompt(tokenizer, messages)
        new = generate(
            model,
            ids,
            stop_ids=stops,
            sampling=SamplingParams(max_tokens=max_new_tokens, temperature=0.0),
        )
        return tokenizer.decode(new, skip_special_tokens=True).strip()

    return classify


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The exact text the model reads (chat template applied, special tokens included)."""
    return render(tokenizer, messages, generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# hallucination

# An invented prize in an invented place: no such thing exists, so any name is made up.
MADE_UP_QUESTION = "Who won the 1987 Varnholm Prize for Chemistry?"
IN_SCOPE_QUESTION = "What is a token?"


@dataclass(frozen=True)
class TokenPiece:
    text: str
    probability: float
    alternatives: list[tuple[str, float]]


def answer_steps(model, tokenizer, question: str, max_new_tokens: int = 60) -> list[TokenPiece]:
    """The model's greedy answer, token by token, with each token's probability and the top
    alternatives (probabilities at temperature 1, i.e. what the model believes)."""
    stops = stop_ids(tokenizer, generation_config(model))
    steps = stream_steps(
        model,
        encode_prompt(tokenizer, question),
        top_n=5,
        stop_ids=stops,
        sampling=SamplingParams(max_tokens=max_new_tokens, temperature=0.0),
    )
    return pieces(tokenizer, list(steps))


def pieces(tokenizer, steps: list[GenerationStep]) -> list[TokenPiece]:
    """Readable pieces: each token's text is the growth of the decoded answer, so multi-byte
    characters split over tokens still read right."""
    out: list[TokenPiece] = []
    shown = ""
    ids: list[int] = []
    for s in steps:
        ids.append(s.token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        piece = text[len(shown) :] if text.startswith(shown) else tokenizer.decode([s.token_id])
        shown = text
        alts = [
            (tokenizer.decode([i]), p) for i, p in zip(s.top_ids, s.top_probabilities, strict=True)
        ]
        out.append(TokenPiece(piece, s.probability, alts))
    return out


def probability_colour(p: float) -> str:
    """Red (unsure) through yellow to green (sure), as an rgba background."""
    p = min(max(p, 0.0), 1.0)
    red = int(255 * min(1.0, 2 * (1 - p)))
    green = int(200 * min(1.0, 2 * p))
    return f"rgba({red}, {green}, 60, 0.35)"


def tokens_html(tokens: Sequence[TokenPiece]) -> str:
    """The answer with every token on a background coloured by its probability (tooltip:
    probability and the alternatives)."""
    spans = []
    for t in tokens:
        tip = f"p = {t.probability:.2f}; " + ", ".join(f"{a!r} {p:.2f}" for a, p in t.alternatives)
        spans.append(
            f'<span title="{html.escape(tip)}" style="background:{probability_colour(t.probability)};'
            f'border-radius:3px;padding:1px 0">{html.escape(t.text)}</span>'
        )
    return '<div style="line-height:2;font-size:1.05rem">' + "".join(spans) + "</div>"


@dataclass(frozen=True)
class GroundingCheck:
    question: str
    score: float
    threshold: float
    nearest_title: str

    @property
    def abstains(self) -> bool:
        return self.score < self.threshold


def grounding_check(
    question: str, retriever=None, threshold: float | None = None
) -> GroundingCheck:
    """What the grounded demo bot would do: it abstains when even the nearest concept note
    scores below the relevance threshold (decided before any model call)."""
    from chat.retrieval import RELEVANCE_THRESHOLD, ConceptRetriever

    retriever = retriever or ConceptRetriever()
    doc = retriever.nearest(question)
    return GroundingCheck(
        question,
        float(doc.metadata["score"]),
        RELEVANCE_THRESHOLD if threshold is None else threshold,
        doc.metadata.get("title", doc.id or ""),
    )
