"""Human feedback: store ranked comparisons in SQLite, turn them into preference pairs, retrain.

A comparison is one prompt, several responses and a person's ranking of them (best first). A
ranking of n responses implies n(n−1)/2 ordered pairs "a is better than b", the data a reward
model (Bradley-Terry) and DPO learn from: this is how InstructGPT used its labellers' rankings.

    store = FeedbackStore("feedback.db")
    store.record("What is a token?", ["A piece of text.", "A coin.", "Go away."], ranking=[0, 2, 1])
    store.preference_pairs()   # 3 pairs: (0 > 2), (0 > 1), (2 > 1)
    retrain(store, "runs/feedback")  # reward model + DPO policy on those pairs

The dashboard's human-feedback lab calls this module.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.stages.reward import RewardConfig, train_reward_model
from core.stages.rlhf import RLHFConfig, rlhf

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL,
    responses TEXT NOT NULL,  -- JSON list of strings
    ranking TEXT NOT NULL,    -- JSON list of response indices, best first
    created_at TEXT NOT NULL  -- ISO 8601, UTC
)
"""


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


def check_comparison(prompt: str, responses: list[str], ranking: list[int]) -> None:
    """ValueError naming what is wrong with a comparison (before anything is stored)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: empty")
    if len(responses) < 2:
        raise ValueError(f"responses: need at least 2 to compare, got {len(responses)}")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"responses[{i}]: empty response")
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if r.strip() in seen:
            raise ValueError(f"responses[{i}]: identical to responses[{seen[r.strip()]}]")
        seen[r.strip()] = i
    if sorted(ranking) != list(range(len(responses))):
        raise ValueError(
            f"ranking: {ranking} must list each of the {len(responses)} response indices "
            f"0..{len(responses) - 1} exactly once, best first"
        )


class FeedbackStore:
    """Ranked comparisons in one SQLite file (created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path)
            self._db.execute(SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a usable SQLite database ({e})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(
        self,
        prompt: str,
        responses: list[str],
        ranking: list[int],
        created_at: datetime | None = None,
    ) -> int:
        """Store one ranked comparison; returns its id."""
        check_comparison(prompt, responses, ranking)
        when = (created_at or datetime.now(UTC)).isoformat()
        with self._db:  # a transaction: committed on success, rolled back on error
            cursor = self._db.execute(
                "INSERT INTO comparisons (prompt, responses, ranking, created_at) VALUES (?, ?, ?, ?)",
                (prompt, json.dumps(responses), json.dumps(list(ranking)), when),
            )
        return int(cursor.lastrowid)

    def comparisons(self) -> list[Comparison]:
        rows = self._db.execute(
            "SELECT id, prompt, responses, ranking, created_at FROM comparisons ORDER BY id"
        ).fetchall()
        return [Comparison(i, p, json.loads(r), json.loads(k), t) for i, p, r, k, t in rows]

    def delete(self, comparison_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM comparisons WHERE id = ?", (comparison_id,))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]

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
        Path(path).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        return len(pairs)


def retrain(
    store: FeedbackStore,
    out_dir: str | Path,
    model: str = "tutor-sft",
    reward_overrides: dict | None = None,
    dpo_overrides: dict | None = None,
    progress: bool = False,
) -> dict:
    """Train a reward model and a DPO policy (both from `model`) on the store's pairs.

    Writes out_dir/reward/final (reward model) and out_dir/policy/final (the new chat model);
    returns both stages' reports. Held-out evaluation uses the bundled held-out pairs unless an
    `eval_file` is given in the overrides."""
    pairs = [
        (f"{store.path}: comparison {p['comparison']}", (p["prompt"], p["chosen"], p["rejected"]))
        for p in store.preference_pairs()
    ]
    if not pairs:
        raise ValueError(f"{store.path}: no ranked comparisons yet, nothing to train on")
    out = Path(out_dir)
    rm_cfg = RewardConfig(model=model, **(reward_overrides or {}))
    dpo_cfg = RLHFConfig(method="dpo", model=model, **(dpo_overrides or {}))
    reports = {
        "pairs": len(pairs),
        "reward": train_reward_model(rm_cfg, out / "reward", progress=progress, train_pairs=pairs),
        "policy": rlhf(dpo_cfg, out / "policy", progress=progress, train_pairs=pairs),
    }
    return reports
