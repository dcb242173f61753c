"""The human-feedback store: rankings in SQLite -> preference pairs -> retrained models."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

import pytest

from core.data import load_rows, preference_triple
from core.stages.feedback import FeedbackStore, retrain


def test_record_and_read_back_a_ranked_comparison(tmp_path):
    db = tmp_path / "fb.db"
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with FeedbackStore(db) as store:
        cid = store.record("What is a token?", ["A piece of text.", "A coin.", "Go away."],
                           ranking=[0, 2, 1], created_at=when)  # fmt: skip
    with FeedbackStore(db) as store:  # persisted, not just in memory
        (c,) = store.comparisons()
        assert (c.id, c.prompt, c.ranking) == (cid, "What is a token?", [0, 2, 1])
        assert c.responses == ["A piece of text.", "A coin.", "Go away."]
        assert c.created_at == when.isoformat()
        assert len(store) == 1
    rows = sqlite3.connect(db).execute("SELECT prompt FROM comparisons").fetchall()
    assert rows == [("What is a token?",)]


def test_a_ranking_of_n_gives_all_n_choose_2_ordered_pairs(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        store.record("q", ["a", "b", "c", "d"], ranking=[2, 0, 3, 1])  # c > a > d > b
        store.record("q2", ["x", "y"], ranking=[1, 0])
        pairs = {(p["prompt"], p["chosen"], p["rejected"]) for p in store.preference_pairs()}
        expected = {("q", "c", "a"), ("q", "c", "d"), ("q", "c", "b"), ("q", "a", "d"),
                    ("q", "a", "b"), ("q", "d", "b"), ("q2", "y", "x")}  # fmt: skip
        assert pairs == expected
        path = tmp_path / "pairs.jsonl"
        assert store.export_jsonl(path) == 7
        assert len(load_rows(path, preference_triple)) == 7  # valid training data


@pytest.mark.parametrize(
    ("responses", "ranking", "message"),
    [
        (["a"], [0], "need at least 2"),
        (["a", "b"], [0, 0], "exactly once"),
        (["a", "b"], [0, 1, 2], "exactly once"),
        (["a", " "], [0, 1], "responses[1]: empty response"),
        (["a", "a"], [0, 1], "responses[1]: identical to responses[0]"),
    ],
)
def test_bad_comparisons_are_refused_and_nothing_is_stored(tmp_path, responses, ranking, message):
    with FeedbackStore(tmp_path / "fb.db") as store:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            store.record("q", responses, ranking)
        assert len(store) == 0


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_text("this is not sqlite " * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        FeedbackStore(bad)


def test_retrain_needs_feedback_then_trains_reward_model_and_policy(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        with pytest.raises(ValueError, match="no ranked comparisons"):
            retrain(store, tmp_path / "out")
        store.record("What is a token?", ["A token is a piece of text.", "No.", "Go away."],
                     ranking=[0, 1, 2])  # fmt: skip
        store.record("What is a cat?", ["A cat is an animal.", "I do not know."], ranking=[0, 1])
        evals = tmp_path / "eval.jsonl"
        store.export_jsonl(evals)
        tiny = {"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 3,
                "checkpoint_every": 3, "eval_file": str(evals), "threads": 2}  # fmt: skip
        report = retrain(
            store, tmp_path / "out", model="tutor-base",
            reward_overrides={**tiny, "learning_rate": 1e-3},
            dpo_overrides={**tiny, "learning_rate": 1e-3, "beta": 0.5},
        )  # fmt: skip
    assert report["pairs"] == 4
    assert report["reward"]["train_pairs"] == 4
    assert report["reward"]["eval_accuracy"] >= 0.75  # learnt the four pairs it saw
    first = json.loads((tmp_path / "out/policy/metrics.jsonl").read_text().splitlines()[0])
    assert report["policy"]["eval_dpo_loss"] < first["eval_dpo_loss"]
    assert (tmp_path / "out/reward/final/score_head.safetensors").is_file()
    assert (tmp_path / "out/policy/final/model.safetensors").is_file()
