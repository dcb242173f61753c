"""Reading a user's dataset: JSONL, JSON, CSV or Parquet rows in one of four formats, each row
checked before anything trains, so a malformed row is reported as `file:line: field: reason`
instead of a KeyError an hour into a run.

Formats (auto-detected from the columns, or chosen with `--format`):

- ``alpaca``: ``instruction``, optional ``input`` and ``system``, ``output``
- ``messages``: ``messages``, a list of ``{"role", "content"}`` ending with an assistant turn
- ``prompt_completion``: ``prompt``, ``completion``
- ``text``: ``text`` (plain language modelling: every token is trained on)

Every format except ``text`` becomes a conversation (a list of messages), which the model's chat
template renders (see `finetune.render`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("alpaca", "messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# The columns that identify each format (the first matching wins ties, so put specific first).
SIGNATURES = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, kept by errors="surrogateescape"


class DataError(ValueError):
    """A dataset that cannot be used at all (missing file, unknown format); one line."""


@dataclass
class Issue:
    """One problem with one row: `where` is "file:line" (Parquet: "file:row N")."""

    where: str
    message: str
    field: str | None = None
    severity: str = "error"  # or "warning": reported, never stops a run

    @property
    def reason(self) -> str:
        """The issue without its location: "field: message"."""
        return f"{self.field}: {self.message}" if self.field else self.message

    def __str__(self) -> str:
        label = "warning: " if self.severity == "warning" else ""
        return f"{self.where}: {label}{self.reason}"


@dataclass
class Row:
    where: str  # "file:line"
    raw: str  # the row as it was in the file (for the rejects file)
    data: object = None  # parsed value (dict for a good row)
    issues: list[Issue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(i.severity == "error" for i in self.issues)


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[Row]:
    """Every row of a file, parsed; rows that cannot be parsed carry an error issue."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r} (use {', '.join(SUFFIXES)})"
        )
    if kind == "parquet":
        return _read_parquet(path)
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if kind == "csv":
        return _read_csv(path, text)
    if kind == "json" and not _looks_like_json_lines(text):
        return _read_json_array(path, text)
    return _read_jsonl(path, text)


def _bad_bytes(text: str) -> str | None:
    """'0xff at column 7' for the first undecodable byte, or None if the text is valid UTF-8."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    return f"0x{ord(m.group()) - 0xDC00:02x} at column {m.start() + 1}"


def _utf8_issue(where: str, text: str) -> Issue | None:
    bad = _bad_bytes(text)
    return Issue(where, f"not valid UTF-8 (byte {bad})") if bad else None


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines are not rows
        row = Row(f"{path}:{number}", line)
        issue = _utf8_issue(row.where, line)
        if issue is None:
            try:
                row.data = json.loads(line)
            except json.JSONDecodeError as e:
                issue = Issue(row.where, f"invalid JSON ({e.msg} at column {e.colno})")
        if issue:
            row.issues.append(issue)
        rows.append(row)
    return rows


def _looks_like_json_lines(text: str) -> bool:
    """A .json file that is really JSON Lines (one object per line) is read as such."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return False
    first = stripped.split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _read_json_array(path: Path, text: str) -> list[Row]:
    """A JSON array of objects, parsed element by element so each row knows its line."""
    decoder, rows = json.JSONDecoder(), []
    line, pos = 1, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, pos
        line += text.count("\n", pos, i)
        pos = i
        return line

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise DataError(f"{path}:{line_at(i)}: expected a JSON array of objects ([{{...}}, ...])")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return rows
    while True:
        where = f"{path}:{line_at(i)}"
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            rows.append(Row(where, text[i : i + 200], issues=[Issue(where, _json_stop(e))]))
            return rows
        row = Row(where, text[i:end], value)
        issue = _utf8_issue(where, text[i:end])
        if issue:
            row.issues.append(issue)
        rows.append(row)
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            return rows
        else:
            msg = "invalid JSON (expected ',' or ']' after the row); later rows were not read"
            rows.append(Row(f"{path}:{line_at(i)}", text[i : i + 200], issues=[Issue(where, msg)]))
            return rows


def _json_stop(e: json.JSONDecodeError) -> str:
    return f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); later rows were not read"


def _read_csv(path: Path, text: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    header = [h.strip() for h in header]
    rows, start = [], reader.line_num + 1
    for values in reader:
        where = f"{path}:{start}"
        raw = ",".join(values)
        start = reader.line_num + 1
        if not any(v.strip() for v in values):
            continue
        row = Row(where, raw)
        issue = _utf8_issue(where, raw)
        if issue is None and len(values) != len(header):
            issue = Issue(where, f"has {len(values)} columns, the header has {len(header)}")
        if issue:
            row.issues.append(issue)
        else:
            row.data = dict(zip(header, values, strict=True))
            # A list-valued column in CSV is JSON text; decode it so the format checks apply.
            if row.data.get("messages", "").strip():
                try:
                    row.data["messages"] = json.loads(row.data["messages"])
                except json.JSONDecodeError as e:
                    row.issues.append(Issue(where, f"not valid JSON ({e.msg})", "messages"))
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    rows = []
    for number, record in enumerate(records, start=1):
        row = Row(f"{path}:row {number}", json.dumps(record, default=repr), record)
        for key, value in record.items():
            if isinstance(value, bytes):
                try:
                    record[key] = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    row.issues.append(Issue(row.where, f"not valid UTF-8 (byte at {e.start})", key))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def detect_format(rows: list[Row], where: str) -> str:
    """The format whose columns most rows have (ties: the order of SIGNATURES)."""
    votes: Counter[str] = Counter()
    columns: set[str] = set()
    for row in rows:
        if isinstance(row.data, dict):
            columns.update(row.data)
            for fmt, keys in SIGNATURES.items():
                if all(k in row.data for k in keys):
                    votes[fmt] += 1
                    break
    if not any(isinstance(row.data, dict) for row in rows):
        # Nothing parsed (a binary file, another text format): columns are not the problem.
        first = next((i for row in rows for i in row.issues), None)
        reason = f"{first.where}: {first.reason}" if first else "no row is a JSON object"
        raise DataError(
            f"{where}: not a dataset: no row could be read ({reason}); expected text rows in "
            "JSON Lines, JSON, CSV or Parquet"
        )
    if not votes:
        found = ", ".join(sorted(columns)) or "none"
        raise DataError(
            f"{where}: cannot tell the format from the columns ({found}); expected messages, "
            "instruction+output (alpaca), prompt+completion or text — or pass --format"
        )
    return max(SIGNATURES, key=lambda fmt: votes[fmt])


def _type_name(value: object) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _string(data: dict, key: str, where: str, issues: list[Issue], required: bool = True, what=""):
    """Check data[key] is a (non-empty if required) string; returns it or None."""
    if key not in data or (data[key] is None and not required):
        if required:
            issues.append(Issue(where, "missing field", key))
        return None if required else ""
    value = data[key]
    if not isinstance(value, str):
        issues.append(Issue(where, f"wrong type: expected a string, got {_type_name(value)}", key))
        return None
    if required and not value.strip():
        issues.append(Issue(where, what or "empty", key))
        return None
    return value


def _messages(data: dict, where: str, issues: list[Issue]) -> list[dict] | None:
    if "messages" not in data:
        issues.append(Issue(where, "missing field", "messages"))
        return None
    messages = data["messages"]
    if not isinstance(messages, list):
        msg = f"wrong type: expected an array of messages, got {_type_name(messages)}"
        issues.append(Issue(where, msg, "messages"))
        return None
    if not messages:
        issues.append(Issue(where, "empty conversation", "messages"))
        return None
    clean, before = [], len(issues)
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            got = _type_name(message)
            issues.append(Issue(where, f"wrong type: expected an object, got {got}", name))
            continue
        role = message.get("role")
        if "role" not in message:
            issues.append(Issue(where, "missing field", f"{name}.role"))
        elif role not in ROLES:
            known = ", ".join(ROLES)
            issues.append(Issue(where, f"unknown role {role!r} (expected {known})", f"{name}.role"))
        what = "empty completion" if role == "assistant" else "empty message"
        content = message.get("content")
        if "content" not in message:
            issues.append(Issue(where, "missing field", f"{name}.content"))
        elif not isinstance(message["content"], str):
            got = _type_name(message["content"])
            msg = f"wrong type: expected a string, got {got}"
            issues.append(Issue(where, msg, f"{name}.content"))
        elif not message["content"].strip():
            issues.append(Issue(where, what, f"{name}.content"))
        clean.append({"role": role, "content": content})
    if len(issues) > before:
        return None
    if clean[-1]["role"] != "assistant":
        msg = f"the last turn is {clean[-1]['role']!r}: a conversation must end with an assistant turn"
        issues.append(Issue(where, msg, "messages"))
        return None
    if all(m["role"] == "assistant" for m in clean):
        issues.append(Issue(where, "no user turn before the assistant's answer", "messages"))
        return None
    return clean


def to_conversation(data: object, fmt: str, where: str) -> tuple[list[dict] | str | None, list]:
    """A row as messages (or plain text for the text format), plus its issues."""
    issues: list[Issue] = []
    if not isinstance(data, dict):
        issues.append(Issue(where, f"expected a JSON object, got {_type_name(data)}"))
        return None, issues
    if fmt == "text":
        return _string(data, "text", where, issues), issues
    if fmt == "messages":
        return _messages(data, where, issues), issues
    if fmt == "alpaca":
        instruction = _string(data, "instruction", where, issues)
        extra = _string(data, "input", where, issues, required=False)
        system = _string(data, "system", where, issues, required=False)
        output = _string(data, "output", where, issues, what="empty completion")
        if issues:
            return None, issues
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        conversation = [{"role": "system", "content": system}] if system else []
        return [
            *conversation,
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ], issues
    if fmt == "prompt_completion":
        prompt = _string(data, "prompt", where, issues)
        completion = _string(data, "completion", where, issues, what="empty completion")
        if issues:
            return None, issues
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ], issues
    raise DataError(f"unknown format {fmt!r} (expected {', '.join(FORMATS)} or auto)")


def mark_duplicates(rows: list[Row], conversations: list) -> None:
    """Identical conversations after parsing get a warning naming the first occurrence."""
    first: dict[str, str] = {}
    for row, conversation in zip(rows, conversations, strict=True):
        if conversation is None:
            continue
        key = json.dumps(conversation, sort_keys=True)
        if key in first:
            row.issues.append(Issue(row.where, f"duplicate of {first[key]}", severity="warning"))
        else:
            number = row.where.rsplit(":", 1)[-1]
            first[key] = number if number.startswith("row") else f"line {number}"
