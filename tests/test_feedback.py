"""The human-feedback store: rankings in SQLite -> preference pairs -> retrained models."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from datetime import UTC, datetime

import numpy as np
import pytest

from core.train.data import load_rows, preference_triple
from core.train.stages.feedback import (
    MAX_PROMPT_CHARS,
    MAX_RESPONSE_CHARS,
    MAX_RESPONSES,
    SCHEMA,
    FeedbackStore,
    FeedbackStoreBusyError,
    FeedbackStoreError,
    retrain,
)


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
    with pytest.raises(FeedbackStoreError, match="is not an SQLite database") as e:
        FeedbackStore(bad)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)
    assert not isinstance(e.value, FeedbackStoreBusyError)
    with pytest.raises(FeedbackStoreError, match="SQLite error: unable to open"):
        FeedbackStore(tmp_path)  # a folder


LONG = "x" * 5_000_000  # the 5 MB paste the issue found accepted


@pytest.mark.parametrize(
    ("prompt", "responses", "ranking", "message"),
    [
        ("q", ["a", "b"], [1.0, 0.0], "ranking[0]: expected an int response index, got 1.0"),
        ("q", ["a", "b"], [True, False], "ranking[0]: expected an int response index, got True"),
        ("q", ["a", "b"], iter([0, 1]), "ranking: expected a list of response indices"),
        ("q", ["a", "b"], "01", "ranking: expected a list of response indices, got str"),
        ("q", "ab", [0, 1], "responses: expected a list of strings, got str"),
        ("q", ["a", 2], [0, 1], "responses[1]: expected text, got int"),
        ("q", ["a", LONG], [0, 1],
         f"responses[1]: 5,000,000 characters, at most {MAX_RESPONSE_CHARS:,}"),
        ("q", [str(i) for i in range(MAX_RESPONSES + 1)], list(range(MAX_RESPONSES + 1)),
         f"at most {MAX_RESPONSES}"),
        (None, ["a", "b"], [0, 1], "prompt: expected text, got NoneType"),
        ("  ", ["a", "b"], [0, 1], "prompt: empty"),
        ("q" * (MAX_PROMPT_CHARS + 1), ["a", "b"], [0, 1], f"at most {MAX_PROMPT_CHARS:,}"),
    ],
)  # fmt: skip
def test_wrong_types_and_sizes_are_refused_at_the_door(
    tmp_path, prompt, responses, ranking, message
):
    with FeedbackStore(tmp_path / "fb.db") as store:
        with pytest.raises(ValueError) as e:
            store.record(prompt, responses, ranking)
        assert message in str(e.value) and "\n" not in str(e.value)
        assert len(store) == 0
        assert store.preference_pairs() == []  # the store still reads


def test_numpy_ints_and_tuples_are_stored_as_plain_json(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        store.record("q", ("a", "b", "c"), ranking=np.array([2, 0, 1]).tolist())
        store.record("q2", ["a", "b"], ranking=(np.int64(1), np.int64(0)))
        assert [c.ranking for c in store.comparisons()] == [[2, 0, 1], [1, 0]]
    raw = sqlite3.connect(tmp_path / "fb.db").execute("SELECT responses, ranking FROM comparisons")
    assert raw.fetchall() == [('["a", "b", "c"]', "[2, 0, 1]"), ('["a", "b"]', "[1, 0]")]


def test_malformed_rows_in_an_old_store_are_skipped_not_fatal(tmp_path, caplog):
    """Rows an older version let in (float or short rankings, a string as responses, not JSON)
    are left out with their ids; the good rows still give their pairs."""
    db = tmp_path / "old.db"
    raw = sqlite3.connect(db)
    raw.execute(SCHEMA)
    rows = [
        ("good", '["a", "b"]', "[1, 0]"),
        ("float ranking", '["a", "b"]', "[1.0, 0.0]"),
        ("iterator stored as []", '["a", "b"]', "[]"),
        ("string responses", '"ab"', "[0, 1]"),
        ("not json", "[a, b", "[0, 1]"),
        ("a number, not text", 7, "[0, 1]"),
        ("index out of range", '["a", "b"]', "[0, 2]"),
        ("good too", '["x", "y", "z"]', "[2, 1, 0]"),
    ]
    raw.executemany(
        "INSERT INTO comparisons (prompt, responses, ranking, created_at) VALUES (?, ?, ?, 'then')",
        rows,
    )
    raw.commit()
    raw.close()
    with FeedbackStore(db) as store, caplog.at_level(logging.WARNING):
        pairs = store.preference_pairs()
        assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
            ("good", "b", "a"),
            ("good too", "z", "y"), ("good too", "z", "x"), ("good too", "y", "x"),
        ]  # fmt: skip
        assert [i for i, _ in store.skipped] == [2, 3, 4, 5, 6, 7]
        assert "ranking[0]: expected an int response index, got 1.0" in store.skipped[0][1]
        assert len(store) == len(rows)  # nothing deleted: the rows can still be repaired by hand
    assert "skipped 6 malformed comparison(s) (ids 2, 3, 4, 5, 6 ...)" in caplog.text


def test_saving_the_same_ranking_twice_stores_it_once(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        first = store.record("q", ["a", "b", "c"], [0, 1, 2])
        assert store.find("q", ["a", "b", "c"], [0, 1, 2]) == first
        assert store.record("q", ("a", "b", "c"), [0, 1, 2]) == first
        assert len(store) == 1 and len(store.preference_pairs()) == 3
        assert store.find("q", ["a", "b", "c"], [2, 1, 0]) is None
        assert store.record("q", ["a", "b", "c"], [2, 1, 0]) != first  # another opinion counts
        assert len(store) == 2


HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN " + sys.argv[2])
db.execute("INSERT INTO comparisons (prompt, responses, ranking, created_at) "
           "VALUES ('p', '[]', '[]', 'now')")
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


@contextmanager
def lock_held_by_another_process(db, mode):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db), mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_locked_store_says_busy_and_retry_not_unusable(tmp_path):
    db = tmp_path / "fb.db"
    FeedbackStore(db).close()
    # A writer mid-transaction in another process:
    with lock_held_by_another_process(db, "IMMEDIATE"), FeedbackStore(db, timeout=0.1) as store:
        assert store.preference_pairs() == []  # readers are not blocked
        with pytest.raises(FeedbackStoreBusyError, match="busy, another process holds") as e:
            store.record("q", ["a", "b"], [0, 1])
        assert str(e.value) == (
            f"{db}: busy, another process holds its write lock (waited 0.1 s); retry in a moment"
        )
    # A writer committing: no reads either, so even opening the store says busy.
    with (
        lock_held_by_another_process(db, "EXCLUSIVE"),
        pytest.raises(FeedbackStoreBusyError, match="retry in a moment"),
    ):
        FeedbackStore(db, timeout=0.1)
    with FeedbackStore(db) as store:  # the other process rolled back; nothing left half done
        store.record("q", ["a", "b"], [0, 1])
        assert len(store) == 1


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
