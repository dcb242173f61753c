"""Human feedback: store ranked comparisons in SQLite, turn them into preference pairs, retrain.

A comparison is one prompt, several responses and a person's ranking of them (best first). A
ranking of n responses implies n(n−1)/2 ordered pairs "a is better than b", the data a reward
model (Bradley-Terry) and DPO learn from: this is how InstructGPT used its labellers' rankings.

    store = FeedbackStore("feedback.db")
    store.record("What is a token?", ["A piece of text.", "A coin.", "Go away."], ranking=[0, 2, 1])
    store.preference_pairs()   # 3 pairs: (0 > 2), (0 > 1), (2 > 1)
    retrain(store, "runs/feedback")  # reward model + DPO policy on those pairs

Everything is checked at the door (`check_comparison`), so one bad call cannot poison the store;
rows that an older version wrote badly are skipped on reading (`FeedbackStore.skipped`), never a
crash. SQLite problems become one-line `FeedbackStoreError`s naming the file. The dashboard's
human-feedback lab calls this module.
"""

from __future__ import annotations

import json
import logging
import numbers
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.atomic import write_text_atomic
from core.lm.generate import answer
from core.lm.loader import load_model, resolve_model_path
from core.lm.tokenizer import load_tokenizer
from core.train.stages.reward import (
    RewardConfig,
    RewardModel,
    load_reward_model,
    train_reward_model,
)
from core.train.stages.rlhf import RLHFConfig, rlhf

log = logging.getLogger(__name__)

# Limits on one comparison. The lab stores 2-3 tutor answers of at most 60 tokens (a few hundred
# characters) to a question that fits a 128-token context; these leave room for bigger models and
# hand-written rows while keeping one row under ~40 KB, so a paste accident cannot bloat the file.
MIN_RESPONSES = 2  # a ranking needs at least two things to compare
MAX_RESPONSES = 9  # InstructGPT's labellers ranked 4 to 9; 9 gives 36 pairs
MAX_PROMPT_CHARS = 2_000
MAX_RESPONSE_CHARS = 4_000
BUSY_TIMEOUT_S = 5.0  # how long to wait for another process's write lock before saying "busy"

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL,
    responses TEXT NOT NULL,  -- JSON list of strings
    ranking TEXT NOT NULL,    -- JSON list of response indices, best first
    created_at TEXT NOT NULL  -- ISO 8601, UTC
)
"""


class FeedbackStoreError(ValueError):
    """The SQLite file cannot be used (one line naming the file); a ValueError like the
    validation errors, so callers catching ValueError see both."""


class FeedbackStoreBusyError(FeedbackStoreError):
    """Another process holds the store's write lock: retrying later will work."""


@dataclass(frozen=True)
class Comparison:
    id: int
    prompt: str
    responses: list[str]
    ranking: list[int]  # indices into responses, best first
    created_at: str

    def pairs(self) -> list[tuple[str, str]]:
        """Every (better, worse) pair the ranking implies."""
        ordered = [self.responses[i] for i in self.ranking]
        return [
            (ordered[i], ordered[j])
            for i in range(len(ordered))
            for j in range(i + 1, len(ordered))
        ]


def _kind(value: object) -> str:
    return type(value).__name__


def _check_ranking(ranking: object, n: int) -> list[int]:
    """The ranking as plain ints; ValueError unless it is a permutation of range(n)."""
    # Only real sequences: an iterator would be used up by the check and stored as [].
    if not isinstance(ranking, list | tuple):
        raise ValueError(f"ranking: expected a list of response indices, got {_kind(ranking)}")
    for i, k in enumerate(ranking):
        # bool is an int subclass and 1.0 == 1, but neither indexes a list when pairs are read.
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ValueError(f"ranking[{i}]: expected an int response index, got {k!r}")
    order = [int(k) for k in ranking]
    if sorted(order) != list(range(n)):
        raise ValueError(
            f"ranking: {order} must list each of the {n} response indices "
            f"0..{n - 1} exactly once, best first"
        )
    return order


def check_comparison(prompt: str, responses: list[str], ranking: list[int]) -> list[int]:
    """ValueError naming the field and the limit when a comparison is malformed (before anything
    is stored); returns the ranking as plain ints."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected text, got {_kind(prompt)}")
    if not prompt.strip():
        raise ValueError("prompt: empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt: {len(prompt):,} characters, at most {MAX_PROMPT_CHARS:,}")
    # A str is a sequence too: "ab" would be stored as two one-letter responses.
    if not isinstance(responses, list | tuple):
        raise ValueError(f"responses: expected a list of strings, got {_kind(responses)}")
    if len(responses) < MIN_RESPONSES:
        raise ValueError(
            f"responses: need at least {MIN_RESPONSES} to compare, got {len(responses)}"
        )
    if len(responses) > MAX_RESPONSES:
        raise ValueError(f"responses: {len(responses)} given, at most {MAX_RESPONSES}")
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise ValueError(f"responses[{i}]: expected text, got {_kind(r)}")
        if not r.strip():
            raise ValueError(f"responses[{i}]: empty response")
        if len(r) > MAX_RESPONSE_CHARS:
            raise ValueError(
                f"responses[{i}]: {len(r):,} characters, at most {MAX_RESPONSE_CHARS:,}"
            )
        if r.strip() in seen:
            raise ValueError(f"responses[{i}]: identical to responses[{seen[r.strip()]}]")
        seen[r.strip()] = i
    return _check_ranking(ranking, len(responses))


def _decode_row(row: tuple) -> Comparison:
    """A stored row as a Comparison; ValueError saying what is wrong with it. Only the shape that
    `pairs()` relies on is required: rows within older, looser limits still count."""
    cid, prompt, responses_json, ranking_json, created_at = row
    if not isinstance(prompt, str):
        raise ValueError(f"prompt is {_kind(prompt)}, not text")
    try:
        responses, ranking = json.loads(responses_json), json.loads(ranking_json)
    except (TypeError, ValueError) as e:  # TypeError: SQLite stored a number, not JSON text
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError("responses is not a list of strings")
    order = _check_ranking(ranking, len(responses))
    return Comparison(int(cid), prompt, responses, order, str(created_at))


class FeedbackStore:
    """Ranked comparisons in one SQLite file (created if missing).

    `timeout` is how long to wait for another process's lock (SQLite's busy timeout) before
    FeedbackStoreBusyError. After each read, `skipped` lists (row id, reason) for malformed rows
    that were left out."""

    def __init__(self, path: str | Path, timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.skipped: list[tuple[int, str]] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FeedbackStoreError(f"{self.path}: cannot create its folder ({e})") from e
        self._db: sqlite3.Connection | None = None
        db = None
        try:
            # Autocommit mode: writes open their own BEGIN IMMEDIATE transaction (see _write),
            # so the duplicate check and the insert happen under one lock.
            db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            db.execute(SCHEMA)
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise self._error(e) from e
        self._db = db

    def _error(self, e: sqlite3.Error) -> FeedbackStoreError:
        """One line for an SQLite error, by its result code (Python 3.11+ names it)."""
        code = getattr(e, "sqlite_errorname", "") or ""
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(e):
            return FeedbackStoreBusyError(
                f"{self.path}: busy, another process holds its write lock "
                f"(waited {self.timeout:g} s); retry in a moment"
            )
        if code == "SQLITE_NOTADB" or "not a database" in str(e):
            return FeedbackStoreError(
                f"{self.path}: this file is not an SQLite database; "
                "move it away or use another path"
            )
        if code.startswith("SQLITE_CORRUPT"):
            return FeedbackStoreError(f"{self.path}: the SQLite database is damaged ({e})")
        return FeedbackStoreError(f"{self.path}: SQLite error: {e}")

    @contextmanager
    def _sqlite(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise self._error(e) from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any error."""
        db = self._connection()
        with self._sqlite():
            db.execute("BEGIN IMMEDIATE")  # take the write lock now (waits up to `timeout`)
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise FeedbackStoreError(f"{self.path}: the store is closed")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _find(self, db: sqlite3.Connection, key: tuple[str, str, str]) -> int | None:
        row = db.execute(
            "SELECT id FROM comparisons WHERE prompt = ? AND responses = ? AND ranking = ? "
            "ORDER BY id LIMIT 1",
            key,
        ).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _key(prompt: str, responses: list[str], ranking: list[int]) -> tuple[str, str, str]:
        # The exact JSON `record` writes, so a lookup matches rows stored before this check.
        return prompt, json.dumps(list(responses)), json.dumps(ranking)

    def find(self, prompt: str, responses: list[str], ranking: list[int]) -> int | None:
        """Id of the stored comparison with exactly this prompt, responses and ranking, if any."""
        order = check_comparison(prompt, responses, ranking)
        with self._sqlite():
            return self._find(self._connection(), self._key(prompt, responses, order))

    def record(
        self,
        prompt: str,
        responses: list[str],
        ranking: list[int],
        created_at: datetime | None = None,
    ) -> int:
        """Store one ranked comparison; returns its id. Saving the same comparison again stores
        nothing and returns the first one's id (duplicates would double-count its pairs)."""
        order = check_comparison(prompt, responses, ranking)
        key = self._key(prompt, responses, order)
        when = (created_at or datetime.now(UTC)).isoformat()
        with self._write() as db:
            existing = self._find(db, key)
            if existing is not None:
                return existing
            cursor = db.execute(
                "INSERT INTO comparisons (prompt, responses, ranking, created_at) "
                "VALUES (?, ?, ?, ?)",
                (*key, when),
            )
        return int(cursor.lastrowid)

    def comparisons(self) -> list[Comparison]:
        """Every well-formed stored comparison, oldest first; malformed rows (written by an
        older version) are left out and listed in `skipped`."""
        with self._sqlite():
            rows = (
                self._connection()
                .execute(
                    "SELECT id, prompt, responses, ranking, created_at FROM comparisons ORDER BY id"
                )
                .fetchall()
            )
        good: list[Comparison] = []
        skipped: list[tuple[int, str]] = []
        for row in rows:
            try:
                good.append(_decode_row(row))
            except ValueError as e:
                skipped.append((row[0], str(e)))
        self.skipped = skipped
        if skipped:
            ids = ", ".join(str(i) for i, _ in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
            log.warning(
                "%s: skipped %d malformed comparison(s) (ids %s)", self.path, len(skipped), ids
            )
        return good

    def delete(self, comparison_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM comparisons WHERE id = ?", (comparison_id,))

    def __len__(self) -> int:
        """Stored rows, malformed ones included."""
        with self._sqlite():
            return self._connection().execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]

    def preference_pairs(self) -> list[dict]:
        """All ordered pairs implied by all rankings, as {"prompt", "chosen", "rejected"} rows."""
        return [
            {"prompt": c.prompt, "chosen": better, "rejected": worse, "comparison": c.id}
            for c in self.comparisons()
            for better, worse in c.pairs()
        ]

    def export_jsonl(self, path: str | Path) -> int:
        """Write the preference pairs as JSONL (the format `genai-lab reward`/`rlhf` read)."""
        pairs = self.preference_pairs()
        write_text_atomic(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        return len(pairs)


def retrain(
    store: FeedbackStore,
    out_dir: str | Path,
    model: str = "tutor-sft",
    reward_overrides: dict | None = None,
    dpo_overrides: dict | None = None,
    progress: bool = False,
    resume: bool = False,
) -> dict:
    """Train a reward model and a DPO policy (both from `model`) on the store's pairs.

    Writes out_dir/reward/final (reward model) and out_dir/policy/final (the new chat model);
    returns both stages' reports. Held-out evaluation uses the bundled held-out pairs unless an
    `eval_file` is given in the overrides; without a `batch_size` there, a batch holds at most
    as many pairs as there are (`measure_retrain` then shows what changed). `resume` continues
    both stages from their newest checkpoints in out_dir (a cancelled retrain)."""
    pairs = [
        (f"{store.path}: comparison {p['comparison']}", (p["prompt"], p["chosen"], p["rejected"]))
        for p in store.preference_pairs()
    ]
    if not pairs:
        raise ValueError(f"{store.path}: no ranked comparisons yet, nothing to train on")
    out = Path(out_dir)
    rm_cfg = RewardConfig(model=model, **_batch_within(pairs, reward_overrides, RewardConfig))
    dpo_cfg = RLHFConfig(
        method="dpo", model=model, **_batch_within(pairs, dpo_overrides, RLHFConfig)
    )
    reports = {
        "pairs": len(pairs),
        "reward": train_reward_model(
            rm_cfg, out / "reward", resume=resume, progress=progress, train_pairs=pairs
        ),
        "policy": rlhf(
            dpo_cfg, out / "policy", resume=resume, progress=progress, train_pairs=pairs
        ),
    }
    return reports


def _batch_within(pairs: list, overrides: dict | None, cls: type) -> dict:
    """The overrides, with a default batch no bigger than the pairs (rounded up to a multiple of
    `minibatches`, which RLHFConfig checks for DPO too): a batch is drawn with replacement, so 16
    rows out of a lab's 3 pairs only repeat them, at 5x the cost of a step."""
    values = dict(overrides or {})
    per = int(values.get("minibatches", getattr(cls, "minibatches", 1)))
    size = min(cls.batch_size, len(pairs))
    values.setdefault("batch_size", -(-size // per) * per)
    return values


# -- what a retrain changed, on the answers that were ranked ------------------------------------

MEASURED_COMPARISONS = 20  # the newest rankings scored answer by answer after a retrain
ANSWERED_PROMPTS = 5  # the newest ranked questions answered by the policy before and after


def _score(rm, tokenizer, prompts: list[str], responses: list[str]) -> list[float]:
    return [round(float(x), 4) for x in rm.score_texts(tokenizer, prompts, responses)]


def measure_retrain(comparisons: list[Comparison], out_dir: str | Path, model: str = "tutor-sft"):
    """What a finished `retrain` into `out_dir` changed, measured on the ranked answers
    themselves (the newest MEASURED_COMPARISONS of `comparisons`, the ones it trained on):

    - "ranked": one row per answer (comparison, prompt, rank 1 = best, answer) with its reward
      `before` (the reward model the retrain starts from: `model`'s backbone with a new,
      zero-initialised score head, so every answer scores 0) and `after` (out_dir/reward/final);
    - "pairs": of the pairs the rankings imply, how many the reward model orders like you,
      before and after (a tie is not agreement);
    - "answers": the greedy answer to each of the newest ANSWERED_PROMPTS ranked questions,
      `before` (`model`) and `after` (the DPO policy, out_dir/policy/final).
    """
    out = Path(out_dir)
    shown = comparisons[-MEASURED_COMPARISONS:]
    folder = resolve_model_path(model)
    tokenizer = load_tokenizer(folder)
    start = load_model(folder).eval()
    reward_models = {
        "before": RewardModel(start).eval(),
        "after": load_reward_model(out / "reward" / "final"),
    }
    rows = [
        {"comparison": c.id, "prompt": c.prompt, "rank": rank + 1, "answer": c.responses[i]}
        for c in shown
        for rank, i in enumerate(c.ranking)
    ]
    prompts, texts = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    for when, rm in reward_models.items():
        for row, score in zip(rows, _score(rm, tokenizer, prompts, texts), strict=True):
            row[when] = score
    pairs = {"total": 0, "before": 0, "after": 0}
    for c in shown:
        ranked = [r for r in rows if r["comparison"] == c.id]  # best first
        for i, better in enumerate(ranked):
            for worse in ranked[i + 1 :]:
                pairs["total"] += 1
                for when in ("before", "after"):
                    pairs[when] += better[when] > worse[when]
    policy = load_model(out / "policy" / "final").eval()
    questions = list(dict.fromkeys(c.prompt for c in reversed(shown)))[:ANSWERED_PROMPTS]
    answers = [
        {"prompt": q, "before": answer(start, tokenizer, q), "after": answer(policy, tokenizer, q)}
        for q in questions
    ]
    return {"ranked": rows, "pairs": pairs, "answers": answers}
