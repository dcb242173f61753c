"""Tables and figures for the "Next token & sampling" page; pure functions of model outputs.

The numbers all come from `core.lm.sampling` (which mirrors transformers' logits warpers), so what
the page shows is exactly what generation samples from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from core.content import corpus
from core.lm.chat_format import encode_prompt
from core.lm.generate import GenerationStep
from core.lm.sampling import SamplingStages, kl_divergence
from core.train.evaluate import word_probabilities
from dashboard.lib.tokens import bpe_token_bytes, readable_bytes, show_whitespace

# Longer text is cut before tokenizing (it could not fit the model's context anyway).
MAX_PROMPT_CHARS = 2000

# Colours for the fate of a token, shared by the bars and the legend.
KEPT = "#1f77b4"
KEPT_LIGHT = "#9ecae1"
CUT_BY_TEMPERATURE = "#bbbbbb"  # only at temperature 0 (greedy keeps one token)
CUT_BY_TOP_K = "#f4a582"
CUT_BY_TOP_P = "#fddbc7"

# -----------------------------------------------------------------------------
# readable token strings


def token_label(tokenizer, token_id: int) -> str:
    """A token as readable text, drawn as on the Tokens page: spaces as ·, newlines as ↵, bytes
    that are only part of a UTF-8 character as ⟨e2⟩, other control characters escaped (\\x06)."""
    raw = tokenizer.convert_ids_to_tokens(int(token_id))
    if raw is None:
        return f"<id {token_id}>"
    if raw in tokenizer.all_special_tokens:
        return raw
    try:
        text, _ = readable_bytes(bpe_token_bytes(raw))
    except KeyError:  # not a byte-level vocabulary: show the tokenizer's own spelling
        return raw
    text = show_whitespace(text)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def token_labels(tokenizer, token_ids: list[int]) -> list[str]:
    """`token_label` for each id, made unique (a plot's category axis merges equal labels)."""
    labels = [token_label(tokenizer, i) for i in token_ids]
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return [
        f"{label} (id {i})" if seen[label] > 1 else label
        for label, i in zip(labels, token_ids, strict=True)
    ]


# -----------------------------------------------------------------------------
# the prompt


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the model: [<|endoftext|>, tokens...], cut to fit the context."""

    ids: list[int]
    num_tokens: int  # tokens of the text as given, before any cut (the <|endoftext|> excluded)
    cut_chars: int  # characters dropped from the front of an over-long text
    cut_tokens: int  # tokens dropped from the front to fit the context

    @property
    def message(self) -> str | None:
        """Why the model sees less than was typed, or None."""
        if not (self.cut_chars or self.cut_tokens):
            return None
        parts = []
        if self.cut_chars:
            parts.append(f"the text was cut to its last {MAX_PROMPT_CHARS:,} characters")
        if self.cut_tokens:
            parts.append(f"only its last {len(self.ids)} tokens fit the model's context")
        return "Long prompt: " + " and ".join(parts) + "."


def fit_document_prompt(
    tokenizer, text: str, max_tokens: int, document_start: bool = True
) -> Prompt:
    """Tokenize a prompt the way documents looked in training (after <|endoftext|>, for the
    tutor; `document_start=False` for models whose BOS marks something else, such as a chat
    turn) and keep at most ``max_tokens``, the most recent ones, as generation would."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    cut_chars = max(0, len(text) - MAX_PROMPT_CHARS)
    text = text[cut_chars:]
    body = tokenizer.encode(text, add_special_tokens=False)
    # After a character cut the text no longer starts a document: no <|endoftext|> before it.
    start = not cut_chars and document_start
    ids = encode_prompt(tokenizer, text, chat=False) if start else body
    cut_tokens = max(0, len(ids) - max_tokens)
    return Prompt(ids[cut_tokens:], len(body), cut_chars, cut_tokens)


@torch.inference_mode()
def next_token_logits(model, ids: list[int]) -> Tensor:
    """Our GPT's raw logits [vocab] (fp32) for the token after ``ids``."""
    device = model.model.embed_tokens.weight.device
    return model(torch.tensor([ids], device=device))[0, -1].float().cpu()


# -----------------------------------------------------------------------------
# the distribution after each filter


def fate(stages: SamplingStages, token_id: int, temperature: float) -> str:
    """Why a token can or cannot be sampled under the current settings."""
    if bool(stages.kept_top_p[token_id]):
        return "kept"
    if not bool(stages.kept_top_k[token_id]):
        return "cut: greedy keeps only the top token" if temperature == 0 else "cut by top-k"
    return "cut by top-p"


def distribution_table(
    stages: SamplingStages, tokenizer, temperature: float, top_n: int = 20
) -> pd.DataFrame:
    """The ``top_n`` most likely tokens (a temperature never changes their order) with their
    probability before any filter, after temperature, and in the end, and their fate."""
    top_n = min(top_n, stages.original.numel())
    ids = stages.original.topk(top_n).indices.tolist()
    return pd.DataFrame(
        {
            "id": ids,
            "token": token_labels(tokenizer, ids),
            "model": [float(stages.original[i]) for i in ids],
            "after temperature": [float(stages.after_temperature[i]) for i in ids],
            "sampled from": [float(stages.final[i]) for i in ids],
            "fate": [fate(stages, i, temperature) for i in ids],
        }
    )


def survivors(stages: SamplingStages, min_probability: float = 0.01) -> tuple[int, int]:
    """How many tokens survive every filter, and how many of them have at least
    ``min_probability`` (at a low temperature most survivors have a chance of ~0)."""
    return int(stages.kept_top_p.sum()), int((stages.final >= min_probability).sum())


@dataclass(frozen=True)
class SamplingCounts:
    """How many tokens are in play after the filters, at three levels of "in play"."""

    kept: int  # not removed by any filter: probability above zero in exact arithmetic
    at_least_tiny: int  # of those, with probability >= `tiny` (default 1e-6)
    at_least_likely: int  # of those, with probability >= `likely` (default 1%)
    tiny: float
    likely: float


def sampling_counts(
    stages: SamplingStages, tiny: float = 1e-6, likely: float = 0.01
) -> SamplingCounts:
    """Tokens that can be sampled (no filter removed them, however small their chance) and how
    many of them have a chance of at least ``tiny`` and at least ``likely``. At a low temperature
    nearly every kept token has a chance far below ``tiny``: "can be sampled" and "entropy 0"
    are then both true."""
    kept = stages.kept_top_p
    final = stages.final
    return SamplingCounts(
        kept=int(kept.sum()),
        at_least_tiny=int((kept & (final >= tiny)).sum()),
        at_least_likely=int((kept & (final >= likely)).sum()),
        tiny=tiny,
        likely=likely,
    )


def sample_frequencies(samples: Tensor, ids: list[int]) -> list[float]:
    """Fraction of ``samples`` equal to each id (samples outside ``ids`` are not shown)."""
    n = samples.numel()
    if n == 0:
        return [0.0] * len(ids)
    counts = torch.bincount(samples, minlength=max(ids) + 1)
    return [counts[i].item() / n for i in ids]


_FATE_COLOURS = {
    "kept": KEPT_LIGHT,
    "cut by top-k": CUT_BY_TOP_K,
    "cut by top-p": CUT_BY_TOP_P,
    "cut: greedy keeps only the top token": CUT_BY_TEMPERATURE,
}


def distribution_figure(table: pd.DataFrame, frequencies: list[float] | None = None) -> go.Figure:
    """Wide bars: each token's probability after the temperature, coloured by its fate; narrow
    dark bars: the probability it is finally sampled with (survivors renormalised); hollow
    circles: the model's own probability (temperature 1); black diamonds: sampled fractions."""
    fig = go.Figure()
    for fate_name, colour in _FATE_COLOURS.items():
        rows = table[table["fate"] == fate_name]
        if not rows.empty:
            fig.add_bar(
                x=rows["token"],
                y=rows["after temperature"],
                width=0.8,
                name="after temperature" if fate_name == "kept" else fate_name,
                marker_color=colour,
                hovertemplate="%{x}: %{y:.4f}<extra>after temperature</extra>",
            )
    fig.add_bar(
        x=table["token"],
        y=table["sampled from"],
        width=0.35,
        name="sampled from (survivors renormalised)",
        marker_color=KEPT,
        hovertemplate="%{x}: %{y:.4f}<extra>sampled from</extra>",
    )
    fig.add_scatter(
        x=table["token"],
        y=table["model"],
        mode="markers",
        name="model (temperature 1, no filter)",
        marker={"symbol": "circle-open", "size": 10, "color": "#333333"},
        hovertemplate="%{x}: %{y:.4f}<extra>model</extra>",
    )
    if frequencies is not None:
        fig.add_scatter(
            x=table["token"],
            y=frequencies,
            mode="markers",
            name="fraction of the samples",
            marker={"symbol": "diamond", "size": 11, "color": "black"},
            hovertemplate="%{x}: %{y:.2f}<extra>sampled</extra>",
        )
    fig.update_layout(
        barmode="overlay",
        xaxis={
            "categoryorder": "array",
            "categoryarray": list(table["token"]),
            "title": f"next token (the {len(table)} most likely, · = a space)",
        },
        yaxis={"title": "probability", "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.35},
        margin={"t": 10, "b": 10},
        height=460,
    )
    return fig


# -----------------------------------------------------------------------------
# the truth, for prompts the bundled corpus can produce


@dataclass(frozen=True)
class WordComparison:
    table: pd.DataFrame  # word, true, model: one row per possible next word, most likely first
    kl: float  # KL(true || model) in nats
    model_mass: float  # total model probability on the words the corpus allows


def true_next_words(prefix: str) -> dict[str, float] | None:
    """The exact next-word distribution if the bundled corpus can produce ``prefix``, else None."""
    try:
        return corpus.next_word_distribution(prefix)
    except ValueError:
        return None


def compare_with_truth(model, tokenizer, prefix: str, truth: dict[str, float]) -> WordComparison:
    """The model's probability of each possible next word (chain rule over its tokens) beside the
    true one, and KL(true || model): the extra nats per word a code built on the model costs."""
    model_p = word_probabilities(model, tokenizer, prefix, list(truth))
    words = list(truth)
    p = torch.tensor([truth[w] for w in words], dtype=torch.float64)
    q = torch.tensor([model_p[w] for w in words], dtype=torch.float64)
    table = pd.DataFrame({"word": words, "true": p.tolist(), "model": q.tolist()})
    return WordComparison(table, kl_divergence(p, q), float(q.sum()))


def comparison_figure(table: pd.DataFrame, max_words: int = 15) -> go.Figure:
    shown = table.head(max_words)
    labels = [w.replace(corpus.END_OF_TEXT, "(end of document)") for w in shown["word"]]
    fig = go.Figure()
    fig.add_bar(x=labels, y=shown["true"], name="true (bundled corpus)", marker_color="#2ca02c")
    fig.add_bar(x=labels, y=shown["model"], name="model", marker_color=KEPT)
    fig.update_layout(
        barmode="group",
        xaxis={"title": "next word"},
        yaxis={"title": "probability of the next word", "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.3},
        margin={"t": 10, "b": 10},
        height=340,
    )
    return fig


# -----------------------------------------------------------------------------
# a generation, one token at a time


def step_table(tokenizer, step: GenerationStep) -> pd.DataFrame:
    """The model's top alternatives at one generation step; the chosen token is marked."""
    return pd.DataFrame(
        {
            "token": token_labels(tokenizer, step.top_ids),
            "probability": step.top_probabilities,
            "chosen": ["◀" if i == step.token_id else "" for i in step.top_ids],
        }
    )


_MARKDOWN_SPECIAL = set("\\`*_{}[]()#+-.!|<>~$:")


def escape_markdown(text: str) -> str:
    """Text that Streamlit's markdown shows literally."""
    return "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in text)


def surprisal_bits(probability: float) -> float:
    """-log2 p: how surprising a chosen token was (1 bit = a fair coin flip)."""
    return math.inf if probability <= 0 else -math.log2(probability)
