"""The embeddings page's data and charts: preset sentences, parsing the visitor's own, and the
plotly figures for projections and the similarity heatmap (the maths is in chat.embeddings)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import plotly.express as px
import plotly.graph_objects as go

MAX_SENTENCES = 40  # the visitor's own, on top of the presets
MAX_SENTENCE_CHARS = 300  # MiniLM reads at most 256 word pieces; this stays well inside

SEED_PAIR = ("The sun is shining brightly.", "Cats and dogs are popular pets.")

# Topics, so a good projection shows clusters. "bank" appears in two senses on purpose.
PRESETS: dict[str, tuple[str, ...]] = {
    "weather": (
        SEED_PAIR[0],
        "It is a bright, sunny day.",
        "Heavy rain is expected tomorrow.",
        "Snow covered the mountains overnight.",
    ),
    "pets": (
        SEED_PAIR[1],
        "My dog loves chasing the ball.",
        "The kitten is asleep on the sofa.",
        "A puppy needs a lot of attention.",
    ),
    "food": (
        "I cooked pasta for dinner.",
        "This soup needs more salt.",
        "Fresh bread smells wonderful.",
        "We ordered pizza last night.",
    ),
    "programming": (
        "Python is a popular programming language.",
        "The function returns a list of numbers.",
        "I fixed a bug in the code.",
        "Unit tests catch mistakes early.",
    ),
    "money": (
        "The bank raised its interest rates.",
        "She saved money in her bank account.",
        "Stock prices fell sharply today.",
    ),
    "rivers": (
        "We had a picnic on the river bank.",
        "The river flooded the valley.",
    ),
}

# Candidates for word arithmetic: the answers to the preset analogies and distractors.
DEFAULT_CANDIDATES = tuple(
    " ".join(
        (
            "queen princess prince lady woman girl boy man king emperor empress mother father",
            "aunt uncle wife husband daughter son actress actor",
            "Paris Berlin Rome Madrid London Tokyo France Germany Italy Spain England Japan",
            "walked walking swam swimming ran running",
            "smaller bigger small big kitten puppy cat dog calf cow",
        )
    ).split()
)

ANALOGIES: tuple[tuple[str, str, str], ...] = (
    ("king", "man", "woman"),
    ("Paris", "France", "Germany"),
    ("walked", "walk", "swim"),
    ("bigger", "big", "small"),
    ("puppy", "dog", "cat"),
)


def preset_sentences(topics: list[str]) -> list[tuple[str, str]]:
    """[(sentence, topic)] of the chosen preset topics, in a stable order."""
    unknown = [t for t in topics if t not in PRESETS]
    if unknown:
        raise ValueError(f"unknown topic(s): {', '.join(unknown)}")
    return [(s, t) for t in PRESETS if t in topics for s in PRESETS[t]]


@dataclass
class ParsedSentences:
    sentences: list[str]
    notes: list[str] = field(default_factory=list)  # what was shortened, skipped or merged


def parse_sentences(
    text: str,
    already: list[str] = (),
    max_sentences: int = MAX_SENTENCES,
    max_chars: int = MAX_SENTENCE_CHARS,
) -> ParsedSentences:
    """One sentence per line. Blank lines are ignored; duplicates (also of `already`) are kept
    once; long lines are cut at `max_chars`; lines beyond `max_sentences` are left out. Every
    such change is reported in `notes`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    notes = []
    if len(lines) > max_sentences:
        notes.append(
            f"Only the first {max_sentences} of your {len(lines)} lines are used "
            f"({len(lines) - max_sentences} left out)."
        )
        lines = lines[:max_sentences]
    long = sum(len(line) > max_chars for line in lines)
    if long:
        notes.append(f"{long} line(s) longer than {max_chars} characters were cut there.")
        lines = [line[:max_chars] for line in lines]
    seen = set(already)
    kept = []
    for line in lines:
        if line not in seen:
            kept.append(line)
            seen.add(line)
    if len(kept) < len(lines):
        notes.append(f"{len(lines) - len(kept)} repeated sentence(s) are shown once.")
    return ParsedSentences(kept, notes)


def short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


TOPIC_COLOURS = {
    "weather": "#1f77b4",
    "pets": "#ff7f0e",
    "food": "#2ca02c",
    "programming": "#9467bd",
    "money": "#8c564b",
    "rivers": "#17becf",
    "yours": "#d62728",
}


AXIS_NAMES = {"pca": "PC", "tsne": "t-SNE ", "umap": "UMAP "}


def axis_titles(method: str, dims: int) -> list[str]:
    """["PC1", "PC2"], ["t-SNE 1", "t-SNE 2", "t-SNE 3"], ...: what each projected axis is."""
    return [f"{AXIS_NAMES[method]}{d + 1}" for d in range(dims)]


def projection_figure(
    points: np.ndarray, sentences: list[str], topics: list[str], method: str = "pca"
) -> go.Figure:
    """2-D or 3-D scatter of projected sentences, coloured by topic. Each point is labelled with
    its number (as in the heatmap), so labels stay short and do not overlap; hover shows the
    whole sentence. Each point's customdata[0] is its index in `sentences` (for selections)."""
    dims = points.shape[1]
    titles = axis_titles(method, dims)
    data = {
        "x": points[:, 0],
        "y": points[:, 1],
        "topic": topics,
        "sentence": sentences,
        "index": list(range(len(sentences))),
        "label": [str(i + 1) for i in range(len(sentences))],
    }
    common = {
        "color": "topic",
        "color_discrete_map": TOPIC_COLOURS,
        "hover_name": "sentence",
        "text": "label",
        "custom_data": ["index"],
        "labels": {"x": titles[0], "y": titles[1]},
    }
    hover = {"x": False, "y": False, "label": True, "topic": True, "index": False}
    if dims == 3:
        common["labels"] |= {"z": titles[2]}
        figure = px.scatter_3d(data | {"z": points[:, 2]}, x="x", y="y", z="z", **common,
                               hover_data=hover | {"z": False})  # fmt: skip
        figure.update_traces(marker={"size": 5}, textfont={"size": 10})
        figure.update_layout(
            scene={"xaxis_title": titles[0], "yaxis_title": titles[1], "zaxis_title": titles[2]}
        )
    else:
        figure = px.scatter(data, x="x", y="y", **common, hover_data=hover)
        figure.update_traces(marker={"size": 12}, textposition="top center", textfont={"size": 10})
        # Room for the labels: plotly sizes the axes to the markers only.
        for axis, values, pad, title in (
            (figure.update_xaxes, points[:, 0], 0.06, titles[0]),
            (figure.update_yaxes, points[:, 1], 0.08, titles[1]),
        ):
            span = float(values.max() - values.min()) or 1.0
            axis(
                showticklabels=method == "pca",  # t-SNE and UMAP coordinates mean nothing
                title=title,
                range=[values.min() - pad * span, values.max() + pad * span],
            )
    figure.update_layout(height=520, margin={"t": 10, "l": 10, "r": 10, "b": 10})
    return figure


def selected_index(event) -> int | None:
    """The sentence index of the first point selected on a `projection_figure` chart (the value
    `st.plotly_chart(..., on_select="rerun")` returns), or None."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    for point in points:
        custom = point.get("customdata")
        if custom:
            return int(custom[0])
    return None


def neighbour_rows(similarity: np.ndarray, sentences: list[str], index: int, k: int) -> list[dict]:
    """The `k` sentences closest to sentence `index` by cosine similarity (itself left out)."""
    order = [int(j) for j in np.argsort(-similarity[index], kind="stable") if j != index][:k]
    return [
        {"rank": r + 1, "cosine similarity": round(float(similarity[index, j]), 3),
         "#": j + 1, "sentence": sentences[j]}
        for r, j in enumerate(order)
    ]  # fmt: skip


def heatmap_figure(similarity: np.ndarray, sentences: list[str]) -> go.Figure:
    """Cosine-similarity matrix as a heatmap; hover shows both sentences and the value."""
    labels = [f"{i + 1}. {short(s)}" for i, s in enumerate(sentences)]
    hover = [[f"{a}<br>{b}" for b in sentences] for a in sentences]
    figure = go.Figure(
        go.Heatmap(
            z=similarity,
            x=labels,
            y=labels,
            zmin=-0.2,
            zmax=1.0,
            colorscale="Viridis",
            customdata=hover,
            hovertemplate="%{customdata}<br>cosine similarity %{z:.2f}<extra></extra>",
        )
    )
    figure.update_layout(
        height=max(420, 22 * len(sentences) + 160),
        margin={"t": 10, "l": 10, "r": 10, "b": 10},
        xaxis={"title": "sentence"},
        yaxis={"autorange": "reversed", "title": "sentence"},
    )
    return figure
