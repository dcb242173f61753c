"""The Prompting & hallucination page: few-shot prompts, the accuracy count, the grounded bot's
abstention check, and the page itself through AppTest (slow: it loads SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from chat.retrieval import RELEVANCE_THRESHOLD, ConceptRetriever
from dashboard.lib.prompting import (
    HELD_OUT,
    IN_SCOPE_QUESTION,
    MADE_UP_QUESTION,
    SHOTS,
    Example,
    accuracy,
    build_messages,
    evaluate,
    grounding_check,
    lenient_label,
    parse_label,
    pieces,
    probability_colour,
    tokens_html,
    user_message,
)

PAGE = Path(__file__).parents[1] / "dashboard" / "views" / "prompting.py"


@pytest.mark.parametrize("k", range(len(SHOTS) + 1))
def test_the_prompt_has_exactly_k_examples_and_no_held_out_one(k):
    item = HELD_OUT[3]
    messages = build_messages(item.text, k)
    answers = [m for m in messages if m["role"] == "assistant"]
    questions = [m["content"] for m in messages if m["role"] == "user"]
    assert len(answers) == k and len(questions) == k + 1
    assert questions[-1] == user_message(item.text)  # the real question comes last
    held_out_prompts = {user_message(h.text) for h in HELD_OUT}
    assert not held_out_prompts & set(questions[:-1])  # never a held-out review as an example
    assert [a["content"] for a in answers] == [s.label for s in SHOTS[:k]]


def test_the_shots_and_the_held_out_set_are_apart_and_balanced():
    assert not {s.text for s in SHOTS} & {h.text for h in HELD_OUT}
    assert sum(h.label == "positive" for h in HELD_OUT) == len(HELD_OUT) // 2
    with pytest.raises(ValueError):
        build_messages("x", len(SHOTS) + 1)


def test_labels_are_parsed_strictly_and_leniently():
    assert parse_label("Positive.") == "positive"
    assert parse_label("negative") == "negative"
    assert parse_label("This review is positive") is None  # not the one word asked for
    assert lenient_label("This review is positive") == "positive"
    assert lenient_label("positive or negative") is None  # names both: no answer


def test_the_accuracy_is_counted_on_a_deterministic_stand_in():
    assert accuracy(["positive", None, "negative"], ["positive", "negative", "positive"]) == 1 / 3
    items = [Example("good", "positive"), Example("bad", "negative"), Example("meh", "negative")]

    def stand_in(messages: list[dict]) -> str:  # reads only the last review: "good" -> right
        text = messages[-1]["content"]
        return (
            "Positive"
            if text.endswith("good")
            else ("It is negative" if "bad" in text else "negative")
        )

    result = evaluate(stand_in, 2, items)
    assert [p.predicted for p in result.predictions] == ["positive", None, "negative"]
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.lenient_accuracy == 1.0
    assert result.answered_positive == 1


def test_the_answer_is_drawn_token_by_token_with_escaped_text():
    class Tok:  # decodes ids as characters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    from core.lm.generate import GenerationStep

    steps = [GenerationStep(ord(c), p, [ord(c)], [p]) for c, p in (("<", 0.9), ("b", 0.1))]
    out = pieces(Tok(), steps)
    assert [t.text for t in out] == ["<", "b"]
    page = tokens_html(out)
    assert "&lt;" in page and "<b" not in page.replace("<span", "")
    assert probability_colour(1.0) != probability_colour(0.0)


@pytest.fixture(scope="module")
def retriever() -> ConceptRetriever:
    return ConceptRetriever()


def test_the_grounded_bot_abstains_on_the_made_up_question_only(retriever):
    made_up = grounding_check(MADE_UP_QUESTION, retriever)
    in_scope = grounding_check(IN_SCOPE_QUESTION, retriever)
    assert made_up.threshold == in_scope.threshold == RELEVANCE_THRESHOLD
    assert made_up.score < RELEVANCE_THRESHOLD and made_up.abstains
    assert in_scope.score > RELEVANCE_THRESHOLD and not in_scope.abstains
    assert retriever.search(MADE_UP_QUESTION) == []  # what the bot's chain sees: no source


@pytest.mark.slow
def test_the_page_opens_without_the_model_and_answers_on_request():
    at = AppTest.from_file(str(PAGE), default_timeout=600).run()
    assert not at.exception and not at.error
    labels = {m.label for m in at.metric}
    assert "Threshold" in labels and "0-shot accuracy" not in labels  # measuring waits a click
    assert any("abstains" in s.value for s in at.success)
    at.button(key="ask_smollm").click().run()
    assert not at.exception and not at.error
    assert any("tokens; " in c.value for c in at.caption)
