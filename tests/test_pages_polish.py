"""Page polish of Tokens, Next token and Embeddings: word-boundary cuts, characters per token, the
chat-template view, "can be sampled" counts, axis titles and nearest neighbours of a point."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.lm.loader import resolve_model_path
from core.lm.sampling import sampling_stages
from core.lm.tokenizer import load_tokenizer
from dashboard.lib import embeddings, next_token, tokens

PAGES = Path(__file__).resolve().parent.parent / "dashboard" / "views"


@pytest.mark.parametrize(
    "text",
    [
        "alpha beta gamma delta",
        "antidisestablishmentarianism is long, and so is floccinaucinihilipilification",
        "one\ttwo\nthree  four five",
        "word " * 500,
    ],
)
@pytest.mark.parametrize("limit", [3, 7, 12, 20, 33])
def test_cap_text_never_splits_a_word(text, limit):
    cut, was_cut = tokens.cap_text(text, limit)
    assert len(cut) <= limit and was_cut == (len(text) > limit)
    if was_cut and any(c.isspace() for c in text[1:limit]):
        assert text.startswith(cut)
        assert set(cut.split()) <= set(text.split())  # only whole words survive
        assert text[len(cut)].isspace()  # the cut falls before whitespace


def test_cap_text_without_whitespace_cuts_hard():
    assert tokens.cap_text("abcdef", 3) == ("abc", True)
    assert tokens.cap_text("ab cdef", 5) == ("ab", True)
    assert tokens.cap_text("ab cd", 5) == ("ab cd", False)


def test_characters_per_token_and_comparison_rows():
    assert tokens.chars_per_token("abcdef", 3) == 2.0 and tokens.chars_per_token("x", 0) == 0.0
    text = "The cat sat."
    bpe = load_tokenizer(resolve_model_path("tutor-base"))
    segments = tokens.bpe_segments(bpe, text)
    (row,) = tokens.comparison_rows(text, [("ours", len(bpe), segments)])
    assert row["tokens"] == len(segments)
    assert row["characters per token"] == round(len(text) / len(segments), 2)
    assert row["vocabulary"] == f"{len(bpe):,}"
    assert row["words per token"] == round(3 / len(segments), 2)
    # The 3/4-of-a-word rule is a property of a tokenizer and a text, not a constant: the
    # tutor's English-only vocabulary packs far fewer Russian words into a token.
    english, russian = "The cat sat on the mat.", "Кошка сидела на коврике."
    per_token = {
        t: tokens.words_per_token(t, len(tokens.bpe_segments(bpe, t))) for t in (english, russian)
    }
    assert per_token[english] > 2 * per_token[russian] > 0


def test_sampling_counts_explain_can_be_sampled():
    logits = torch.tensor([10.0, 9.0, 0.0, -5.0])
    cold = next_token.sampling_counts(sampling_stages(logits, temperature=0.01))
    assert cold.kept == 4  # no filter removed anything ...
    assert cold.at_least_tiny == 1 and cold.at_least_likely == 1  # ... but one token has it all
    warm = next_token.sampling_counts(sampling_stages(logits, 1.0, top_k=2))
    assert (warm.kept, warm.at_least_tiny, warm.at_least_likely) == (2, 2, 2)
    greedy = next_token.sampling_counts(sampling_stages(logits, temperature=0.0))
    assert greedy.kept == 1


def test_sampling_figures_have_axis_titles():
    bpe = load_tokenizer(resolve_model_path("tutor-base"))
    stages = sampling_stages(torch.randn(len(bpe)), 1.0)
    table = next_token.distribution_table(stages, bpe, 1.0, top_n=5)
    fig = next_token.distribution_figure(table)
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    words = pd.DataFrame({"word": ["mat", "sofa"], "true": [0.5, 0.5], "model": [0.4, 0.3]})
    fig = next_token.comparison_figure(words)
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


@pytest.mark.parametrize(
    ("method", "x", "y"),
    [("pca", "PC1", "PC2"), ("tsne", "t-SNE 1", "t-SNE 2"), ("umap", "UMAP 1", "UMAP 2")],
)
def test_projection_figure_axis_titles_and_short_labels(method, x, y):
    sentences = ["A long sentence about the weather today.", "Cats sleep.", "Dogs run fast."]
    points = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    fig = embeddings.projection_figure(points, sentences, ["weather", "pets", "pets"], method)
    assert fig.layout.xaxis.title.text == x and fig.layout.yaxis.title.text == y
    labels = [t for trace in fig.data for t in trace.text]
    assert sorted(labels) == ["1", "2", "3"]  # short labels; the sentence is in the hover
    indices = sorted(int(c[0]) for trace in fig.data for c in trace.customdata)
    assert indices == [0, 1, 2]
    fig3 = embeddings.projection_figure(
        np.c_[points, [0.1, 0.2, 0.3]], sentences, ["weather", "pets", "pets"], method
    )
    assert fig3.layout.scene.zaxis.title.text == f"{x[:-1]}3"


def test_heatmap_axis_titles_selection_and_neighbours():
    sim = np.array([[1.0, 0.2, 0.9], [0.2, 1.0, 0.1], [0.9, 0.1, 1.0]])
    fig = embeddings.heatmap_figure(sim, ["a", "b", "c"])
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    rows = embeddings.neighbour_rows(sim, ["a", "b", "c"], 0, 2)
    assert [r["sentence"] for r in rows] == ["c", "b"] and rows[0]["#"] == 3
    event = {"selection": {"points": [{"customdata": [2], "point_index": 0}]}}
    assert embeddings.selected_index(event) == 2
    assert embeddings.selected_index({"selection": {"points": []}}) is None
    assert embeddings.selected_index(None) is None


def test_next_token_page_defaults_show_the_formula_and_explain_the_counts():
    at = AppTest.from_file(str(PAGES / "next_token.py"), default_timeout=120).run()
    assert not at.exception
    assert any("exp(z_i / T)" in latex.value for latex in at.get("latex"))
    assert any("one in a million" in c.value for c in at.caption)
    assert at.slider(key="nt_steps").value >= 8
    at.button(key="nt_all").click().run()
    assert not at.exception
    assert any(f"Step {at.slider(key='nt_steps').value} of" in c.value for c in at.caption)


def test_tokens_page_defaults_show_three_tokenizers_and_the_chat_template():
    at = AppTest.from_file(str(PAGES / "tokens.py"), default_timeout=120).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert len(table) == 3 and (table["characters per token"] > 0).all()
    assert any("<|im_start|>" in c.value for c in at.code)
    at.text_area[0].set_value("word " * 300 + "unfinishedword " * 200).run()
    assert not at.exception
    unseen = {w for m in at.markdown for w in re.findall(r"`(unfini\w*)`", m.value)}
    assert unseen == {"unfinishedword"}  # the cut (mid-word at 2,000) fell at a space


@pytest.mark.slow
def test_chat_template_view_matches_the_template_ids():
    from core.lm.embedded import embedded_folder
    from core.lm.loader import FOUNDATION_MODEL

    smol = load_tokenizer(embedded_folder(FOUNDATION_MODEL))
    messages = [{"role": "user", "content": "Hi!"}]
    view = tokens.chat_template_view(smol, messages)
    assert view.rendered.startswith("<|im_start|>system")  # the template adds a system turn
    assert [s.token_id for s in view.segments] == view.token_ids
    special = [s for s in view.segments if s.kind == "special"]
    assert {s.token for s in special} == {"<|im_start|>", "<|im_end|>"}
    assert tokens.summarize(view.rendered, view.segments).dropped == ""
