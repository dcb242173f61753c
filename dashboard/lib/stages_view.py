"""Data and figures for the training-stages page: the shipped stages' answers side by side, their
training curves, the pipeline's figures, and the human-feedback lab's candidate answers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from core.generate import PromptTooLongError, answer
from core.models import PRETRAINED_DIR
from core.stages.feedback import FeedbackStore

STAGES = (
    ("tutor-base", "1. base (pre-trained)"),
    ("tutor-sft", "2. SFT"),
    ("tutor-rlhf", "3. RLHF (PPO)"),
)
CURVES = {
    "tutor-base": ("loss", "eval_loss"),
    "tutor-sft": ("loss", "eval_loss"),
    "tutor-rlhf": ("reward", "kl", "entropy", "clip_fraction"),
}


def shipped_stages() -> list[tuple[str, str]]:
    return [
        (name, label) for name, label in STAGES if (PRETRAINED_DIR / name / "config.json").is_file()
    ]


def read_metrics(name: str) -> pd.DataFrame:
    """A shipped stage's metrics.jsonl as a table (one row per logged step)."""
    path = PRETRAINED_DIR / name / "metrics.jsonl"
    if not path.is_file():
        return pd.DataFrame()
    return pd.DataFrame([json.loads(x) for x in path.read_text().splitlines() if x.strip()])


def curve_figure(frame: pd.DataFrame, keys: tuple[str, ...], title: str) -> go.Figure:
    fig = go.Figure()
    for key in keys:
        if key in frame:
            rows = frame.dropna(subset=[key])
            fig.add_trace(go.Scatter(x=rows["step"], y=rows[key], mode="lines+markers", name=key))
    fig.update_layout(title=title, xaxis_title="step", height=320, margin={"t": 40, "b": 30})
    return fig


def pipeline_figures(folder: Path = PRETRAINED_DIR / "tutor-rlhf") -> dict | None:
    path = folder / "pipeline_metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def figures_table(metrics: dict) -> pd.DataFrame:
    stages = list(metrics["key_term_accuracy"])
    rows = {"key-term accuracy (held-out questions)": metrics["key_term_accuracy"]}
    rows["mean reward-model score (sampled answers)"] = metrics.get("reward", {})
    rows["KL to the SFT model per answer (nats)"] = metrics.get("kl_to_sft", {})
    rows["reward model prefers it over SFT"] = metrics.get("rm_prefers_over_sft", {})
    rows["sampled answers ending with filler"] = metrics.get("padded_share", {})
    return pd.DataFrame({k: [v.get(s) for s in stages] for k, v in rows.items()}, index=stages).T


def answers_side_by_side(models: dict, question: str, temperature: float, seed: int) -> dict:
    """{stage label: answer} for one question; models maps label -> (model, tokenizer)."""
    return {
        label: answer(model, tok, question, temperature=temperature, seed=seed)
        for label, (model, tok) in models.items()
    }


def candidate_answers(model, tokenizer, question: str, n: int, seed: int) -> list[str]:
    """`n` different sampled answers to rank (temperature 1.2 for variety; duplicates dropped)."""
    seen: list[str] = []
    for i in range(n * 4):
        text = answer(model, tokenizer, question, temperature=1.2, seed=seed + i)
        if text and text not in seen:
            seen.append(text)
        if len(seen) == n:
            break
    return seen


def question_error(error: ValueError) -> str:
    """The one line the page shows instead of a traceback when a question cannot be answered."""
    if isinstance(error, PromptTooLongError):
        return f"The question is too long for the tutor, shorten it: {error}."
    return f"The tutor cannot answer this question: {error}"


def save_ranking(db: Path, prompt: str, answers: list[str], order: list[int]) -> tuple[str, str]:
    """Store the lab's ranking; (Streamlit message kind, one line) to show. Saving the same
    ranking twice adds nothing (its pairs would count twice) and says so."""
    try:
        with FeedbackStore(db) as store:
            existing = store.find(prompt, answers, order)
            if existing is not None:
                return "info", f"Already saved as comparison {existing}; nothing added."
            store.record(prompt, answers, order)
            return "success", f"Saved. The store now holds {len(store)} comparisons."
    except ValueError as e:  # a malformed comparison, or FeedbackStoreError (busy, not SQLite)
        return "error", str(e)


def stored_pairs(db: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """The store's preference pairs, and (Streamlit message kind, one line) to show with them:
    an error when the store cannot be read, a warning when malformed rows were left out."""
    try:
        with FeedbackStore(db) as store:
            pairs = store.preference_pairs()
            skipped = store.skipped
    except ValueError as e:  # FeedbackStoreError: the page still renders, saying why
        return [], [("error", str(e))]
    if not skipped:
        return pairs, []
    ids = ", ".join(str(i) for i, _ in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
    first = skipped[0][1]
    message = f"{db}: left out {len(skipped)} malformed comparison(s) (ids {ids}; first: {first})."
    return pairs, [("warning", message)]
