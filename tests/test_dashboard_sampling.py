"""The Next token & sampling page: its library (dashboard/lib/next_token.py) against references
(transformers' logits warpers, core.train.evaluate) and the page itself through Streamlit's AppTest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from core import load_model
from core.lm.generate import stream_steps
from core.lm.loader import resolve_model_path
from core.lm.sampling import SamplingParams, sample_many, sampling_stages
from core.lm.tokenizer import load_tokenizer
from core.train.evaluate import prefix_kl
from dashboard.lib.next_token import (
    MAX_PROMPT_CHARS,
    compare_with_truth,
    distribution_figure,
    distribution_table,
    escape_markdown,
    fit_document_prompt,
    next_token_logits,
    sample_frequencies,
    step_table,
    surprisal_bits,
    survivors,
    token_label,
    token_labels,
    true_next_words,
)

PAGE = Path(__file__).resolve().parent.parent / "dashboard" / "views" / "next_token.py"


@pytest.fixture(scope="module")
def model():
    return load_model("tutor-base")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("tutor-base"))


@pytest.fixture(scope="module")
def cat_logits(model, tokenizer):
    return next_token_logits(model, fit_document_prompt(tokenizer, "The cat sat on the", 128).ids)


# -----------------------------------------------------------------------------
# tokens and prompts


def test_token_labels_make_whitespace_and_partial_bytes_visible(tokenizer):
    ids = tokenizer.encode(" mat\n\t😀", add_special_tokens=False)
    labels = token_labels(tokenizer, ids)
    assert labels[0] == "·mat"
    assert "↵" in labels and "→" in labels
    # The emoji is four UTF-8 bytes the tokenizer never merged: each is shown as a byte.
    assert [label for label in labels if label.startswith("⟨")] == ["⟨f0⟩", "⟨9f⟩", "⟨98⟩", "⟨80⟩"]
    assert token_label(tokenizer, tokenizer.bos_token_id) == "<|endoftext|>"
    assert token_label(tokenizer, tokenizer.convert_tokens_to_ids("Ć")) == "\\x06"  # control byte


def test_token_labels_are_unique_for_a_plot_axis(tokenizer):
    ids = [565, 565, 300]
    labels = token_labels(tokenizer, ids)
    assert len(set(labels)) == 2 and labels[2] == "ing"  # same id twice: same label, marked
    assert labels[0] == "·mat (id 565)"


def test_prompt_starts_like_a_document_and_long_text_is_cut(tokenizer):
    prompt = fit_document_prompt(tokenizer, "The cat", 128)
    assert prompt.ids == [tokenizer.bos_token_id, *tokenizer.encode("The cat")]
    assert prompt.message is None
    assert fit_document_prompt(tokenizer, "", 128).ids == [tokenizer.bos_token_id]

    long = fit_document_prompt(tokenizer, "The dog ran. " * 50, 128)
    assert len(long.ids) == 128 and long.cut_tokens > 0 and long.cut_chars == 0
    assert long.ids[-5:] == tokenizer.encode("The dog ran. " * 50)[-5:]  # the most recent kept
    assert "128 tokens" in long.message

    huge = fit_document_prompt(tokenizer, "x" * (MAX_PROMPT_CHARS + 500), 128)
    assert huge.cut_chars == 500 and "2,000 characters" in huge.message
    with pytest.raises(ValueError, match="max_tokens"):
        fit_document_prompt(tokenizer, "a", 0)


# -----------------------------------------------------------------------------
# the distribution after each filter


def _transformers_scores(logits, temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores[0]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.9), (0.01, 0, 1.0), (2.0, 3, 0.5)],
)
def test_distribution_table_matches_transformers_warpers(
    cat_logits, tokenizer, temperature, top_k, top_p
):
    stages = sampling_stages(cat_logits, temperature, top_k or None, top_p)
    table = distribution_table(stages, tokenizer, temperature, top_n=20)
    scores = _transformers_scores(cat_logits, temperature, top_k, top_p)
    reference = torch.softmax(scores, dim=-1)
    assert table["sampled from"].tolist() == pytest.approx(
        [reference[i].item() for i in table["id"]], abs=1e-6
    )
    # "kept" exactly where transformers leaves the score finite (a kept token's probability can
    # still underflow to 0 at temperature 0.01).
    assert (table["fate"] == "kept").tolist() == [bool(scores[i].isfinite()) for i in table["id"]]
    assert table["model"].tolist() == sorted(table["model"].tolist(), reverse=True)
    assert (table.loc[table["fate"] != "kept", "sampled from"] == 0).all()


def test_top_k_and_top_p_mark_the_right_tokens(cat_logits, tokenizer):
    stages = sampling_stages(cat_logits, 1.0, 3, None)
    table = distribution_table(stages, tokenizer, 1.0, top_n=10)
    assert table["fate"].tolist()[:3] == ["kept"] * 3
    assert set(table["fate"].tolist()[3:]) == {"cut by top-k"}
    assert survivors(stages)[0] == 3

    probs = torch.softmax(cat_logits, -1).sort(descending=True).values
    stages = sampling_stages(cat_logits, 1.0, None, 0.6)
    n_kept = int((probs.cumsum(0) < 0.6).sum()) + 1  # smallest set reaching 0.6
    table = distribution_table(stages, tokenizer, 1.0, top_n=10)
    assert (table["fate"] == "kept").sum() == n_kept
    assert set(table["fate"].tolist()[n_kept:]) == {"cut by top-p"}


def test_temperature_zero_is_greedy(cat_logits, tokenizer):
    stages = sampling_stages(cat_logits, 0.0, None, None)
    table = distribution_table(stages, tokenizer, 0.0)
    assert table["fate"].tolist()[0] == "kept"
    assert set(table["fate"].tolist()[1:]) == {"cut: greedy keeps only the top token"}
    assert table["sampled from"].tolist()[0] == 1.0
    assert survivors(stages) == (1, 1)


def test_sample_frequencies_count_the_draws(cat_logits):
    samples = sample_many(cat_logits, 1000, 1.0, seed=3)
    ids = torch.softmax(cat_logits, -1).topk(5).indices.tolist()
    freqs = sample_frequencies(samples, ids)
    assert freqs == [(samples == i).sum().item() / 1000 for i in ids]
    probs = torch.softmax(cat_logits, -1)
    # The most likely token's frequency is within 5 standard errors of its probability.
    p = probs[ids[0]].item()
    assert abs(freqs[0] - p) < 5 * math.sqrt(p * (1 - p) / 1000)
    assert sample_frequencies(torch.tensor([], dtype=torch.long), ids) == [0.0] * 5


def test_figure_draws_what_the_table_says(cat_logits, tokenizer):
    stages = sampling_stages(cat_logits, 0.8, 4, None)
    table = distribution_table(stages, tokenizer, 0.8, top_n=8)
    fig = distribution_figure(table, frequencies=[0.5] * 8)
    traces = {trace.name: trace for trace in fig.data}
    assert list(traces["sampled from (survivors renormalised)"].y) == list(table["sampled from"])
    assert list(traces["model (temperature 1, no filter)"].y) == list(table["model"])
    assert list(traces["cut by top-k"].x) == list(table["token"][4:])
    assert list(traces["fraction of the samples"].y) == [0.5] * 8


# -----------------------------------------------------------------------------
# truth, steps, helpers


def test_truth_comparison_agrees_with_core_evaluate(model, tokenizer):
    prefix = "The cat sat on the"
    truth = true_next_words(prefix)
    assert truth == pytest.approx(
        {"mat": 0.4, "table": 0.2, "floor": 0.2, "chair": 0.1, "bed": 0.1}
    )
    result = compare_with_truth(model, tokenizer, prefix, truth)
    assert result.kl == pytest.approx(prefix_kl(model, tokenizer, prefix), rel=1e-6)
    assert result.table["true"].sum() == pytest.approx(1.0)
    assert 0.5 < result.model_mass <= 1.0
    assert true_next_words("Quantum chromodynamics is") is None


def test_step_table_marks_the_chosen_token(model, tokenizer):
    ids = fit_document_prompt(tokenizer, "The cat sat on the", 128).ids
    steps = list(
        stream_steps(model, ids, top_n=5, sampling=SamplingParams(max_tokens=3, temperature=0))
    )
    table = step_table(tokenizer, steps[0])
    assert table["chosen"].tolist()[0] == "◀"  # greedy picks the top alternative
    assert table["token"].tolist()[0] == "·mat"
    assert surprisal_bits(0.5) == 1.0 and surprisal_bits(0.0) == math.inf


def test_escape_markdown_keeps_text_literal():
    assert escape_markdown("a*b_[c](d)") == "a\\*b\\_\\[c\\]\\(d\\)"


# -----------------------------------------------------------------------------
# the page


def _page() -> AppTest:
    return AppTest.from_file(str(PAGE), default_timeout=60).run()


def _chart_data(at: AppTest) -> list:
    return json.loads(at.get("plotly_chart")[0].proto.spec)["data"]


def test_page_renders_and_the_temperature_slider_reshapes_the_chart():
    at = _page()
    assert not at.exception
    before = at.dataframe[0].value["sampled from"].tolist()
    chart_before = _chart_data(at)
    at.slider(key="nt_temperature").set_value(0.3).run()
    assert not at.exception
    after = at.dataframe[0].value["sampled from"].tolist()
    assert after[0] > before[0]  # a lower temperature sharpens the distribution
    assert _chart_data(at) != chart_before
    # The truth section is shown for the default corpus prompt, with its KL.
    assert any(m.label == "KL(true ‖ model)" for m in at.metric)


def test_page_top_k_sample_and_step_controls():
    at = _page()
    at.slider(key="nt_top_k").set_value(2).run()
    fates = at.dataframe[0].value["fate"].tolist()
    assert fates[:2] == ["kept", "kept"] and "cut by top-k" in fates
    at.button(key="nt_sample").click().run()
    assert not at.exception
    assert any(t.get("name") == "fraction of the samples" for t in _chart_data(at))
    at.button(key="nt_next").click().run()
    at.button(key="nt_next").click().run()
    assert not at.exception
    assert any("Step 2 of" in c.value for c in at.caption)


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ({"nt_prompt": ""}, "The prompt is empty"),
        ({"nt_prompt": "The dog ran away. " * 40}, "Long prompt"),
        ({"nt_temperature": 0.0}, "greedy decoding"),
        ({"nt_temperature": 0.01}, None),
    ],
)
def test_page_handles_bad_input_with_a_message(action, expected):
    at = _page()
    for key, value in action.items():
        if key == "nt_prompt":
            at.text_area(key=key).set_value(value)
        else:
            at.slider(key=key).set_value(value)
    at.run()
    assert not at.exception
    messages = " ".join(m.value for m in (*at.info, *at.warning))
    if expected:
        assert expected in messages
    assert at.dataframe[0].value["sampled from"].notna().all()


def test_picking_a_corpus_prompt_fills_the_prompt_and_shows_the_truth():
    at = _page()
    preset = "It was a rainy day. Mia wanted to go to the park. She put on her"
    at.selectbox(key="nt_preset").set_value(preset).run()
    assert not at.exception
    assert at.text_area(key="nt_prompt").value == preset
    assert any(m.label == "KL(true ‖ model)" for m in at.metric)


@pytest.mark.slow
def test_page_switches_to_the_real_model():
    """The same controls on SmolLM2-135M-Instruct: its 49,152-token vocabulary, no corpus
    truth (only tutor-base learnt the bundled corpus), step-by-step generation."""
    at = _page()
    at.radio(key="nt_model").set_value("smollm2-135m-instruct").run()
    assert not at.exception
    assert "of 49,152" in at.metric[0].value
    assert not any(m.label == "KL(true ‖ model)" for m in at.metric)
    assert any("only tutor-base was trained on" in c.value for c in at.caption)
    top = at.dataframe[0].value["token"].tolist()[0]
    at.button(key="nt_next").click().run()
    assert not at.exception and any("Step 1 of" in c.value for c in at.caption)
    assert isinstance(top, str) and top
