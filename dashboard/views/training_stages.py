"""Training stages: pre-training -> supervised fine-tuning -> RLHF, shown on the shipped tutor
models, plus a human-feedback lab that stores your rankings (core.stages.feedback)."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from core.content.concepts import concepts_for_page
from dashboard.lib.stages_view import (
    CURVES,
    answers_side_by_side,
    candidate_answers,
    curve_figure,
    figures_table,
    pipeline_figures,
    question_error,
    read_metrics,
    save_ranking,
    shipped_stages,
    stored_pairs,
)
from dashboard.resources import tutor

# Where rankings are stored; tests point it at a temporary file.
FEEDBACK_DB = Path(os.environ.get("GENAI_LAB_FEEDBACK_DB", "runs/feedback.db"))

st.title("Training stages")
notes = concepts_for_page("training_stages")
for concept in notes[:4]:  # the three stages and the reward model, then the rest on demand
    st.markdown(f"**{concept.title}.** {concept.text}")
with st.expander("PPO, DPO and hallucination: " + ", ".join(c.title for c in notes[4:])):
    for concept in notes[4:]:
        st.markdown(f"**{concept.title}.** {concept.text}")

stages = shipped_stages()

# --- the same question to every stage ---------------------------------------------------------
st.subheader("One question, three stages")
question = st.text_input("Ask the tutor", "What is a token?")
c1, c2 = st.columns(2)
temperature = c1.slider("Temperature (0 = greedy)", 0.0, 1.5, 0.0, 0.1)
seed = c2.number_input("Seed", 0, 10_000, 0)
if question.strip():
    models = {label: tutor(name) for name, label in stages}
    try:
        replies = answers_side_by_side(models, question, temperature, int(seed))
    except ValueError as e:  # PromptTooLongError: the question does not fit the context
        st.error(question_error(e))
        replies = {}
    for label, text in replies.items():
        st.markdown(f"**{label}:** {text or '(nothing)'}")
    st.caption(
        "The base model only continues text. SFT taught it the chat format and the answers, and "
        'also a habit of its demonstrations: about 30% of them end with filler ("Well, as I '
        'said, and so on and so on."), so the SFT model pads some answers (try temperature 1 '
        "and a few seeds). The shipped preference pairs rank padded answers lower by a written "
        "rubric (standing in for the people who rank answers in real RLHF; the lab below lets "
        "you be those people), the reward model learned that, and PPO taught the tutor to stop "
        "after the answer, while a KL penalty kept it close to the SFT model."
    )

# --- the pipeline's figures and curves ----------------------------------------------------------
metrics = pipeline_figures()
if metrics:
    st.subheader("Measured on held-out questions")
    st.dataframe(figures_table(metrics))
    rm = metrics["reward_model"]
    st.caption(
        f"Reward model accuracy on {rm['eval_pairs']} held-out preference pairs: "
        f"{rm['eval_accuracy']:.1%}."
    )
st.subheader("Training curves")
for name, label in stages:
    frame = read_metrics(name)
    if not frame.empty:
        st.plotly_chart(curve_figure(frame, CURVES[name], label), width="stretch")

# --- human feedback lab ---------------------------------------------------------------------------
st.subheader("Human-feedback lab")
st.markdown(
    "Rank the tutor's answers, best first. Each ranking of n answers gives n(n−1)/2 preference "
    "pairs, the data a reward model and DPO learn from (`core.stages.feedback`)."
)
lab_question = st.text_input("Question for ranking", "What is temperature?")
if st.button("Sample answers") and lab_question.strip():
    model, tok = tutor("tutor")
    try:
        st.session_state["lab"] = (lab_question, candidate_answers(model, tok, lab_question, 3, 0))
    except ValueError as e:  # too long: the answers of the last question (if any) stay
        st.error(question_error(e))
if "lab" in st.session_state:
    prompt, answers = st.session_state["lab"]
    for i, text in enumerate(answers):
        st.markdown(f"**{i + 1}.** {text}")
    order = st.multiselect(
        "Your ranking (pick the answers best first)",
        options=list(range(len(answers))),
        format_func=lambda i: f"answer {i + 1}",
    )
    if len(answers) < 2:
        st.info(
            "The tutor gave fewer than two different answers to this question: try another one."
        )
    if st.button("Save ranking", disabled=len(order) != len(answers) or len(answers) < 2):
        kind, message = save_ranking(FEEDBACK_DB, prompt, answers, order)
        getattr(st, kind)(message)  # st.success, st.info or st.error
pairs, notes = stored_pairs(FEEDBACK_DB)
for kind, message in notes:
    getattr(st, kind)(message)  # st.error or st.warning
st.caption(
    f"{len(pairs)} preference pairs in {FEEDBACK_DB}. Retrain with `core.stages.feedback.retrain`."
)
if pairs:
    st.dataframe([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs[-10:]])
