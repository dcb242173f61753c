"""The bundled tutor data and the shipped tutor models (tutor-sft, tutor-rlhf = "tutor")."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from core import load_model
from core.content.concepts import CONCEPTS
from core.content.tutor_data import (
    PADDED_SHARE,
    RAMBLING_FILLERS,
    TUTOR_ANSWERS,
    is_padded,
    key_terms,
    preference_rows,
    sft_rows,
)
from core.lm.chat_format import encode_prompt, stop_ids
from core.lm.generate import sample_batch
from core.lm.loader import PRETRAINED_DIR, resolve_model_path
from core.lm.tokenizer import load_tokenizer
from core.train.data import DATA_DIR, bundled_rows, conversation_messages, preference_triple
from core.train.evaluate import key_term_accuracy
from core.train.stages.rollouts import bucket_by_length, unique_prompts

SHIPPED = [PRETRAINED_DIR / n for n in ("tutor-base", "tutor-sft", "tutor-rlhf")]


# ---------------------------------------------------------------------------------------------
# the bundled data


def test_every_concept_has_a_short_answer_that_says_its_key_term():
    tokenizer = load_tokenizer(PRETRAINED_DIR / "tutor-base")
    assert set(TUTOR_ANSWERS) == {c.id for c in CONCEPTS}
    for concept_id, (_, reference) in TUTOR_ANSWERS.items():
        assert key_terms(concept_id), concept_id
        assert len(tokenizer.encode(reference)) <= 52, concept_id


def test_bundled_files_are_the_generator_output_and_valid():
    for name, rows in (
        ("sft_train.jsonl", sft_rows(held_out=False)),
        ("sft_heldout.jsonl", sft_rows(held_out=True)),
        ("prefs_train.jsonl", preference_rows(held_out=False)),
        ("prefs_heldout.jsonl", preference_rows(held_out=True)),
    ):
        assert bundled_rows(name) == json.loads(json.dumps(rows)), name
        check = preference_triple if name.startswith("prefs") else conversation_messages
        for row in rows:
            check(row)  # raises on a bad row


def test_held_out_questions_are_never_trained_on():
    train = {m["content"] for r in bundled_rows("sft_train.jsonl") for m in r["messages"]}
    train |= {r["prompt"] for r in bundled_rows("prefs_train.jsonl")}
    heldout = [r["messages"][0]["content"] for r in bundled_rows("sft_heldout.jsonl")]
    assert len(heldout) >= 2 * len(CONCEPTS)
    assert not train & set(heldout)
    assert {r["prompt"] for r in bundled_rows("prefs_heldout.jsonl")} <= set(heldout)
    assert any(len(r["messages"]) > 2 for r in bundled_rows("sft_train.jsonl"))  # multi-turn


def test_some_training_demonstrations_are_padded_and_the_rubric_ranks_padding_down():
    """The deliberate flaw RLHF has to fix: ~PADDED_SHARE of the single-turn training answers end
    with filler; held-out answers never do; a rambling rejected answer is a padded chosen one."""
    single = [r for r in sft_rows(held_out=False) if len(r["messages"]) == 2]
    padded = [r for r in single if r["padded"]]
    assert abs(len(padded) / len(single) - PADDED_SHARE) < 0.05
    for r in padded:
        answer = r["messages"][-1]["content"]
        reference = TUTOR_ANSWERS[r["concept"]][1]
        assert answer[len(reference) :] in RAMBLING_FILLERS and answer.startswith(reference)
    assert not any(r["padded"] for r in sft_rows(held_out=True))
    assert all(is_padded(r["messages"][-1]["content"]) for r in padded)
    assert not any(is_padded(r["messages"][-1]["content"]) for r in single if not r["padded"])
    rambling = [r for r in preference_rows(held_out=False) if r["rule"] == "rambling"]
    assert rambling and all(r["rejected"][len(r["chosen"]) :] in RAMBLING_FILLERS for r in rambling)


def test_every_rubric_rule_appears_in_the_preference_data():
    rules = {r["rule"] for r in bundled_rows("prefs_train.jsonl")}
    assert rules == {"wrong", "off-topic", "rambling", "rude", "evasive"}


# ---------------------------------------------------------------------------------------------
# the shipped models

needs_tutor = pytest.mark.skipif(
    not (PRETRAINED_DIR / "tutor-rlhf" / "config.json").is_file(),
    reason="tutor-rlhf not shipped yet (genai-lab pipeline --ship)",
)


@needs_tutor
def test_shipped_weights_are_small_fp16_safetensors():
    total = 0
    for folder in SHIPPED:
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, folder
        assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
        total += (folder / "model.safetensors").stat().st_size
    assert total <= 25 * 1024 * 1024
    assert resolve_model_path("tutor") == PRETRAINED_DIR / "tutor-rlhf"


@needs_tutor
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tutor-sft", "tutor"])
def test_shipped_tutor_answers_held_out_questions_with_the_key_terms(name):
    model = load_model(name)
    tokenizer = load_tokenizer(resolve_model_path(name))
    result = key_term_accuracy(model, tokenizer, bundled_rows("sft_heldout.jsonl"))
    assert result["key_term_accuracy"] >= 0.7, result["samples"]


@needs_tutor
def test_artifact_recorded_pipeline_figures_meet_the_goals():
    """An artifact check: the figures `genai-lab pipeline` recorded when it made the shipped
    models (this reads a file; the slow tier recomputes the key-term and filler figures from
    the shipped weights, and test_pipeline runs the whole pipeline)."""
    metrics = json.loads((PRETRAINED_DIR / "tutor-rlhf" / "pipeline_metrics.json").read_text())
    assert metrics["key_term_accuracy"]["sft"] >= 0.7 > metrics["key_term_accuracy"]["base"]
    assert metrics["key_term_accuracy"]["rlhf"] >= 0.7
    assert metrics["reward_model"]["eval_accuracy"] >= 0.9
    for stage in ("rlhf", "dpo"):  # PPO and DPO: more reward than SFT, preferred on >= 65%
        assert metrics["reward"][stage] > metrics["reward"]["sft"], stage
        assert metrics["rm_prefers_over_sft"][stage] >= 0.65, stage
        assert 0 < metrics["kl_to_sft"][stage] < math.inf, stage
        # the flaw RLHF is there to fix: padded answers become rare
        assert metrics["padded_share"][stage] < metrics["padded_share"]["sft"] / 2, stage
    assert metrics["key_term_vs_sft"]["rlhf"]["worse"] == 0  # PPO broke no greedy answer


@needs_tutor
@pytest.mark.slow
def test_shipped_rlhf_tutor_pads_fewer_sampled_answers_than_sft():
    """Recomputes the filler share from the shipped weights: sampled answers to the held-out
    prompts (4 each, temperature 1, as the pipeline samples) end with filler far less often
    after RLHF than after SFT."""
    rows = [json.loads(x) for x in (DATA_DIR / "prefs_heldout.jsonl").read_text().splitlines()]
    prompts = unique_prompts([("", (r["prompt"], r["chosen"], r["rejected"])) for r in rows])
    shares = {}
    for name in ("tutor-sft", "tutor-rlhf"):
        model = load_model(name)
        tokenizer = load_tokenizer(resolve_model_path(name))
        encoded = [encode_prompt(tokenizer, p) for p in prompts]
        generator = torch.Generator().manual_seed(0)
        padded = total = 0
        for _, idx in sorted(bucket_by_length(encoded).items()):
            batch = torch.tensor([encoded[i] for i in idx for _ in range(4)])
            answers, lengths, _ = sample_batch(
                model, batch, 72, stop_ids(tokenizer), tokenizer.pad_token_id, generator
            )
            for answer, n in zip(answers, lengths, strict=True):
                padded += is_padded(tokenizer.decode(answer[:n], skip_special_tokens=True))
                total += 1
        shares[name] = padded / total
    assert shares["tutor-sft"] > 0.1, shares  # the flaw SFT learned from padded demonstrations
    assert shares["tutor-rlhf"] < shares["tutor-sft"] / 2, shares


@needs_tutor
def test_generate_cli_answers_a_concept_question():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "core", "generate", "--model", "tutor", "--chat",
         "--prompt", "What is a token?", "--temperature", "0"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "token" in result.stdout.lower() and "piece of text" in result.stdout


@needs_tutor
@pytest.mark.slow
def test_training_stages_page_shows_the_stages_and_records_a_ranking(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from core.train.stages.feedback import FeedbackStore

    db = tmp_path / "feedback.db"
    monkeypatch.setenv("GENAI_LAB_FEEDBACK_DB", str(db))
    page = PRETRAINED_DIR.parent.parent / "dashboard" / "views" / "training_stages.py"
    at = AppTest.from_file(str(page), default_timeout=300)
    at.run()
    assert not at.exception
    shown = " ".join(m.value for m in at.markdown)
    assert "**2. SFT:** A token is a piece of text" in shown
    at.button[0].click().run()  # sample answers to rank
    answers = at.session_state["lab"][1]
    assert len(answers) >= 2
    at.multiselect[0].set_value(list(range(len(answers)))).run()
    at.button[1].click().run()  # save the ranking
    assert not at.exception
    with FeedbackStore(db) as store:
        assert len(store) == 1
        assert len(store.preference_pairs()) == len(answers) * (len(answers) - 1) // 2


@needs_tutor
def test_stages_page_table_shows_the_recorded_figures():
    import pandas as pd

    from dashboard.lib.training_stages import figures_table, pipeline_figures

    metrics = pipeline_figures()
    table = figures_table(metrics)
    assert list(table.columns) == list(metrics["key_term_accuracy"])
    row = table.loc["sampled answers ending with filler"]
    assert row["rlhf"] == metrics["padded_share"]["rlhf"] and pd.isna(row["base"])  # not sampled
