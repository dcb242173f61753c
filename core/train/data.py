"""Dataset rows for the training stages: reading JSONL, checking every row before training, and
the bundled data. A bad row stops the run with `file:line: field: reason`, or with `skip_invalid`
is written to a rejects file and counted.

Rows are TRL's formats, one JSON object per line: `{"messages": [{"role", "content"}, ...]}`
(system/user/assistant, multi-turn allowed) or `{"prompt": ..., "response": ...}` (or
"completion") for conversations; `{"prompt", "chosen", "rejected"}` for preferences.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from core.lm.tokenizer import ROLES

DATA_DIR = Path(__file__).parent.parent / "content" / "data"


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message is `file:line: field: reason`."""


def read_jsonl(path: str | Path) -> list[tuple[str, dict | str]]:
    """(file:line, parsed object) per non-blank line, or (file:line, reason) for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{path}: UTF-16 text; save it as UTF-8 JSON Lines")
    if b"\x00" in data[:8192]:
        raise DatasetError(f"{path}: not a JSON Lines text file (binary data)")
    out: list[tuple[str, dict | str]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((where, f"not valid UTF-8 (byte {e.start})"))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((where, f"invalid JSON ({e.msg}, column {e.colno})"))
            continue
        except RecursionError:
            out.append((where, "invalid JSON (nested too deeply to read)"))
            continue
        out.append((where, obj if isinstance(obj, dict) else "expected a JSON object"))
    if not out:
        raise DatasetError(f"{path}: no rows")
    return out


def _text_field(row: dict, key: str) -> str:
    if key not in row:
        raise DatasetError(f"{key}: missing field")
    value = row[key]
    if not isinstance(value, str):
        raise DatasetError(f"{key}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{key}: empty")
    return value


def conversation_messages(row: dict) -> list[dict]:
    """A row (messages or prompt/response) -> checked chat messages; DatasetError(field: reason)."""
    if "messages" not in row:
        if "prompt" in row and ("response" in row or "completion" in row):
            answer_key = "response" if "response" in row else "completion"
            return [
                {"role": "user", "content": _text_field(row, "prompt")},
                {"role": "assistant", "content": _text_field(row, answer_key)},
            ]
        missing = "messages" if "prompt" not in row else "response"
        raise DatasetError(f"{missing}: missing field (need 'messages', or 'prompt' + 'response')")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError("messages: expected a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DatasetError(f"{field}: expected an object with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise DatasetError(f"{field}.{key}: missing field")
        if m["role"] not in ROLES:
            raise DatasetError(
                f"{field}.role: unknown role {m['role']!r} (expected {', '.join(ROLES)})"
            )
        if not isinstance(m["content"], str) or not m["content"].strip():
            what = "empty response" if m["role"] == "assistant" else "empty content"
            raise DatasetError(f"{field}.content: {what}")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise DatasetError("messages: no assistant message to learn from")
    return clean


def preference_triple(row: dict) -> tuple[str, str, str]:
    """A preference row -> (prompt, chosen, rejected); DatasetError(field: reason)."""
    prompt, chosen, rejected = (_text_field(row, k) for k in ("prompt", "chosen", "rejected"))
    if chosen.strip() == rejected.strip():
        raise DatasetError("chosen: identical to rejected (a pair must differ)")
    return prompt, chosen, rejected


def load_rows(
    path: str | Path,
    check: Callable[[dict], object],
    skip_invalid: bool = False,
    rejects_path: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> list[tuple[str, object]]:
    """Read and check every row before training. The first bad row raises `file:line: reason`;
    with `skip_invalid`, bad rows go to `rejects_path` (JSONL with the reason) and are counted."""
    good, rejects = [], []
    for where, obj in read_jsonl(path):
        try:
            if isinstance(obj, str):
                raise DatasetError(obj)
            good.append((where, check(obj)))
        except DatasetError as e:
            if not skip_invalid:
                raise DatasetError(f"{where}: {e}") from None
            rejects.append({"where": where, "reason": str(e), "row": obj})
    if skip_invalid and rejects:
        rejects_path = Path(rejects_path or Path(path).with_suffix(".rejects.jsonl"))
        rejects_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        echo(f"{path}: kept {len(good)} rows, skipped {len(rejects)} invalid -> {rejects_path}")
    if not good:
        raise DatasetError(f"{path}: no valid rows")
    return good


def load_preference_splits(
    cfg, out_dir: Path, train_pairs: list | None, echo: Callable[[str], None] = print
) -> tuple[list, list]:
    """Checked (train, eval) preference triples of a reward/RLHF config (`train_file`, `eval_file`,
    `skip_invalid`); `train_pairs`, when given, replaces the train file (human feedback)."""
    rejects = Path(out_dir) / "rejects"
    if cfg.skip_invalid:
        rejects.mkdir(parents=True, exist_ok=True)
    if train_pairs is None:
        train_pairs = load_rows(
            cfg.train_file, preference_triple, cfg.skip_invalid, rejects / "train.jsonl", echo
        )
    eval_rows = load_rows(
        cfg.eval_file, preference_triple, cfg.skip_invalid, rejects / "eval.jsonl", echo
    )
    return train_pairs, eval_rows


def bundled_rows(name: str) -> list[dict]:
    """Rows of a bundled JSONL file in core/data (with their extra "concept" field)."""
    path = DATA_DIR / name
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
