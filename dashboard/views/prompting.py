"""Prompting & hallucination: zero-shot vs few-shot on a small sentiment task measured on a fixed
held-out set, and a made-up question answered confidently by SmolLM2 next to what the grounded
demo bot does with it."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from chat.retrieval import RELEVANCE_THRESHOLD, ConceptRetriever
from core.lm.loader import FOUNDATION_MODEL
from dashboard.lib.prompting import (
    HELD_OUT,
    MADE_UP_QUESTION,
    MAX_SHOTS,
    SHOTS,
    Evaluation,
    GroundingCheck,
    TokenPiece,
    answer_steps,
    build_messages,
    evaluate,
    grounding_check,
    model_classifier,
    prompt_text,
    tokens_html,
)
from dashboard.resources import tutor

MAX_QUESTION_CHARS = 300  # a question, not a document: keeps one answer to a few seconds


def smollm():
    """SmolLM2 (loaded once per process; converted and cached on the very first use)."""
    with st.spinner("Loading SmolLM2-135M-Instruct (the first time it is converted: ~1 min) ..."):
        return tutor(FOUNDATION_MODEL)


@st.cache_data(show_spinner=False, max_entries=8)
def measured(k: int) -> Evaluation:
    """The held-out accuracy with k shots; greedy, so the same every run and safe to cache."""
    model, tokenizer = smollm()
    return evaluate(model_classifier(model, tokenizer), k)


@st.cache_data(show_spinner=False, max_entries=32)
def hallucinated(question: str) -> list[TokenPiece]:
    model, tokenizer = smollm()
    return answer_steps(model, tokenizer, question)


@st.cache_resource(show_spinner="Embedding the concept notes with MiniLM ...")
def retriever() -> ConceptRetriever:
    return ConceptRetriever()


@st.cache_data(show_spinner=False, max_entries=32)
def grounded(question: str) -> GroundingCheck:
    return grounding_check(question, retriever())


def predictions_table(e: Evaluation) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "review": [p.text for p in e.predictions],
            "label": [p.gold for p in e.predictions],
            "model's reply": [p.answer for p in e.predictions],
            "correct (one word)": [p.correct for p in e.predictions],
        }
    )


st.title("Prompting & hallucination")
st.markdown(
    "A **prompt** is all the text a model reads before it answers: for a chat model, the "
    "system and user messages and any earlier turns, written into one sequence of tokens by the "
    "model's chat template. The model then does what it always does: predicts the next token, "
    "again and again. Changing the prompt is the cheapest way to change what comes out, and "
    "this page measures how much it helps on a real (small) model, SmolLM2-135M-Instruct. It "
    "also shows a model answering a question that has no answer, with full confidence."
)

# ---------------------------------------------------------------------------------------------
st.header("Zero-shot vs few-shot")
st.markdown(
    "**Zero-shot**: the task is described and the model answers straight away. **Few-shot**: "
    "the prompt first shows *k* solved examples (here as earlier chat turns, as if the model "
    "had answered them itself), then the real question. This is *in-context learning*: no "
    "weight changes, nothing is trained; the examples only change what text is likely to come "
    "next, for this prompt only.\n\n"
    f"The task: label a short review *positive* or *negative*, answering with one word. The "
    f"accuracy is measured on {len(HELD_OUT)} held-out reviews (six of each label) that are "
    f"never among the {MAX_SHOTS} examples the prompt can show."
)
st.markdown(
    "**Temperature.** A label has one right answer, so decoding here is *greedy* (temperature "
    "0: always the most likely token). Sampling would only add noise and make the accuracy "
    "change from one run to the next; a higher temperature is for open-ended writing, where "
    "variety is the point."
)


def show_measurements(zero: Evaluation, few: Evaluation, k: int) -> None:
    """The accuracies of both settings and how to read them."""
    c1, c2 = st.columns(2)
    for col, e in ((c1, zero), (c2, few)) if k else ((c1, zero),):
        col.metric(f"{e.k}-shot accuracy", f"{e.accuracy:.0%}")
        col.caption(
            f"Naming the right label anywhere in the reply: {e.lenient_accuracy:.0%}. "
            f'Replies saying "positive": {e.answered_positive} of {len(e.predictions)}.'
        )
    st.caption(
        "Accuracy counts a reply as right only when its first word is the right label (the task "
        "asked for one word). Chance is 50%, and so is a model that always says the same label: "
        'check how many replies say "positive" before reading a 50% as a skill.'
    )
    st.markdown(
        "**Reading the figures.** Without examples a small chat model often ignores a format asked "
        'for in words and writes a sentence ("This review is positive"): the strict count falls, '
        "the lenient one shows whether it still got the label. An example shows the format more "
        "clearly than an instruction does. More examples are not always better: a 135M model may "
        "copy the examples' labels or their order more than it learns the task (try k = 2, 3, 4 "
        "and watch the count of *positive* replies). Larger models usually gain more from "
        "examples; always measure on examples held out from the prompt, as here."
    )
    with st.expander(f"The exact prompt with {k} examples (the first held-out review)"):
        _, tokenizer = smollm()
        st.code(prompt_text(tokenizer, build_messages(HELD_OUT[0].text, k)), language=None)
        st.caption(
            "Written by SmolLM2's own chat template; its default system message comes from the "
            "template, not from us. The model's reply continues after the last line."
        )
    with st.expander("Every reply"):
        left, right = st.columns(2)
        left.markdown("**0-shot**")
        left.dataframe(predictions_table(zero), hide_index=True)
        right.markdown(f"**{k}-shot**")
        right.dataframe(predictions_table(few), hide_index=True)


k = st.slider("Examples in the prompt (k)", 0, MAX_SHOTS, 1)

# Measuring runs 24 greedy answers on a 135M model (tens of seconds on a small CPU): only on
# request, and cached, so the page itself opens at once.
if st.button(f"Measure 0-shot vs {k}-shot on {len(HELD_OUT)} held-out reviews", key="measure"):
    try:
        smollm()
        with st.spinner(f"Classifying {len(HELD_OUT)} reviews with 0 and with {k} examples ..."):
            st.session_state.prompting_measured = (measured(0), measured(k))
    except Exception as e:  # one line for the visitor, never a traceback
        st.error(f"Could not run SmolLM2: {e}")
results = st.session_state.get("prompting_measured")
if results is None or results[1].k != k:
    st.info("Press the button to measure both settings on this machine (cached afterwards).")
else:
    show_measurements(*results, k)

st.caption(
    "The examples the prompt can show: " + "; ".join(f"“{s.text}” → {s.label}" for s in SHOTS)
)

# ---------------------------------------------------------------------------------------------
st.header("Hallucination, live")
st.markdown(
    "Ask the model about something that does not exist: the Varnholm Prize below is made up. "
    "Each token of the answer is coloured by the probability the model gave it (green: sure, "
    "red: unsure; hover for the alternatives)."
)
question = st.text_input("Question", MADE_UP_QUESTION, max_chars=MAX_QUESTION_CHARS).strip()
if not question:
    st.info("Type a question.")
    st.stop()

if st.button("Ask SmolLM2", key="ask_smollm"):
    try:
        smollm()
        with st.spinner("SmolLM2 is answering ..."):
            st.session_state.prompting_answer = (question, hallucinated(question))
    except Exception as e:
        st.error(f"Could not generate an answer: {e}")
asked, steps = st.session_state.get("prompting_answer", (None, []))
if asked != question:
    steps = []

if steps:
    st.markdown(tokens_html(steps), unsafe_allow_html=True)
    sure = sum(s.probability >= 0.9 for s in steps)
    st.caption(
        f"{len(steps)} tokens; {sure} of them at probability 0.9 or more. The repeated words "
        "of the question are near certain; the invented names and facts often are not, yet "
        "greedy decoding writes them in the same fluent, confident voice."
    )
st.markdown(
    "**Why it happens.** A language model is trained to predict likely text, not true text. "
    'After *"Who won the ... Prize?"*, text on the web almost always goes on with a name and '
    'a reason, so a name and a reason are the likely continuation; "I don\'t know" is rare '
    "after such questions in training data, so it is rarely likely. The model has no "
    "separate store of facts to check and no signal that the prize is invented. The "
    "probabilities give a hint (low ones on the key facts), but a fluent sentence hides them, "
    "and a probability measures how usual a token is, not whether the claim is true."
)

st.subheader("What the grounded demo bot does")
try:
    with st.spinner("Scoring the question against the concept notes ..."):
        check = grounded(question)
except Exception as e:
    st.error(f"Could not score the question: {e}")
    st.stop()

m1, m2 = st.columns(2)
m1.metric("Best note's relevance score", f"{check.score:.2f}")
m2.metric("Threshold", f"{check.threshold:.2f}")
if check.abstains:
    st.success(
        f"The bot abstains: even the nearest note (“{check.nearest_title}”) scores below "
        f"{RELEVANCE_THRESHOLD:.2f}, so it says it has no note on this and answers nothing, "
        "before any model is called."
    )
else:
    st.info(
        f"The bot would answer from the note “{check.nearest_title}” and cite the dashboard "
        "page it comes from."
    )
st.markdown(
    "The Chat page's bot first looks the question up in the project's own concept notes "
    "(MiniLM embeddings, cosine similarity). When no note is close enough it says so instead of "
    "letting the model improvise. Grounding does not make a model know more; it gives it a "
    "source to answer from, and a reason to stop when there is none."
)
