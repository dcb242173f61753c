"""Reading a user's dataset: JSONL, JSON, CSV or Parquet rows in one of the formats of
`DATA_FORMATS` (the one table of them: columns, description, an example row and the converter;
`--format`'s help, auto-detection and the dashboard's list are all read from it), each row
checked before anything trains, so a malformed row is reported as `file:line: field: reason`
instead of a KeyError an hour into a run.

Every SFT format except ``text`` becomes a conversation (a list of messages), which the model's
chat template renders (see `finetune.render`). Every assistant turn is trained on (earlier answers
of a conversation and of an alpaca ``history`` too), except one with ``weight`` 0. Preference rows
(``prompt``, ``chosen``, ``rejected``; `--method dpo`) become TRL's conversational pairs.

Other layouts are read through two mappings (`read_rows(columns=...)`, `to_conversation(roles=)`):
``columns`` maps a field name of the table (or ``role``, ``content``, ``weight`` inside a message)
to the file's own column, e.g. ``{"instruction": "question", "output": "answer"}``; ``roles`` maps
the file's role names to system/user/assistant, e.g. ``{"bot": "assistant"}``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MESSAGE_KEYS = ("role", "content", "weight")
# Columns holding a list, which CSV can only store as JSON text.
_LIST_COLUMNS = ("messages", "conversations", "history")
# ShareGPT speaker names (`from`) and what they are; a `roles` mapping adds to / overrides these.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
# Tool-calling turns: no chat template we render has a place for them, so such rows are refused
# by name rather than trained as if the tool output were the user speaking.
TOOL_ROLES = ("tool", "function", "function_call", "observation", "tool_call", "tool_response")
# Byte-order marks of encodings we do not read (UTF-32 LE starts with UTF-16 LE's: check first).
_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32 BE"),
    (b"\xff\xfe\x00\x00", "UTF-32 LE"),
    (b"\xfe\xff", "UTF-16 BE"),
    (b"\xff\xfe", "UTF-16 LE"),
)
_UTF8_BOM = b"\xef\xbb\xbf"
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


def plural(n: int, word: str) -> str:
    """ "1 row", "2 rows"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def read_rows(path: str | Path, columns: dict[str, str] | None = None) -> list[Row]:
    """Every row of a file, parsed; rows that cannot be parsed carry an error issue.

    columns: {our field name: the file's column} (see COLUMNS, MESSAGE_KEYS), applied to every
    row, so detection and checks see our names (issues are reported under the file's names by
    `to_conversation(columns=...)`)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a dataset file; {_data_files_in(path)}")
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r} (use {', '.join(SUFFIXES)})"
        )
    check_columns(columns)
    if kind == "parquet":
        rows = _read_parquet(path)
    else:
        raw = path.read_bytes()
        _refuse_other_encodings(path, raw)
        bom = len(_UTF8_BOM) if raw.startswith(_UTF8_BOM) else 0  # UTF-8 with BOM is fine
        text = _Text(raw[bom:].decode("utf-8", errors="surrogateescape"), bom)
        if kind == "csv":
            rows = _read_csv(path, text)
        elif kind == "json" and not _looks_like_json_lines(text.text):
            rows = _read_json_array(path, text)
        else:
            rows = _read_jsonl(path, text)
    _check_mapped_columns(path, rows, columns)
    for row in rows:
        if isinstance(row.data, dict):
            row.data = _rename(row.data, columns)
            if kind == "csv":
                _decode_csv_lists(row)
    return rows


def _data_files_in(folder: Path, shown: int = 5) -> str:
    """What to pass instead of a folder: the files in it that look like data."""
    try:
        found = sorted(
            p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
        )
    except OSError as e:
        return f"cannot list it ({e.strerror}); pass one data file"
    if not found:
        return f"it holds no data file ({', '.join(SUFFIXES)}); pass one data file"
    more = f" (and {len(found) - shown} more)" if len(found) > shown else ""
    return (
        f"files in it that look like data: {', '.join(found[:shown])}{more}; pass one of them, "
        f"e.g. {folder / found[0]}"
    )


def _check_mapped_columns(path: Path, rows: list[Row], columns: dict[str, str] | None) -> None:
    """Every column a `columns` mapping names must be in the file (in some row): else one line
    naming the missing ones and the columns the file has, instead of a format that cannot be
    told from what is left."""
    if not columns:
        return
    have: dict[str, None] = {}
    inner: dict[str, None] = {}
    lists = {columns.get(k, k) for k in ("messages", "conversations")}
    for row in rows:
        if isinstance(row.data, dict):
            have.update(dict.fromkeys(row.data))
            for key in lists:
                value = row.data.get(key)
                if isinstance(value, list):
                    for message in value:
                        if isinstance(message, dict):
                            inner.update(dict.fromkeys(message))
    if not have:
        return  # nothing parsed: the format check says why
    missing = [
        (ours, theirs)
        for ours, theirs in columns.items()
        if (ours in MESSAGE_KEYS and inner and theirs not in inner)
        or (ours not in MESSAGE_KEYS and theirs not in have)
    ]
    if not missing:
        return
    named = ", ".join(f"{ours}={theirs}" for ours, theirs in missing)
    absent = ", ".join(repr(theirs) for _, theirs in missing)
    where = "its messages" if all(ours in MESSAGE_KEYS for ours, _ in missing) else "the file"
    names = list(inner if where == "its messages" else have)
    found = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    word = "column" if len(missing) == 1 else "columns"
    raise DataError(
        f"{path}: columns: {named}: no {word} {absent} in {where} (it has: {found}); map each "
        "field to one of those (--columns FIELD=COLUMN,...)"
    )


def check_columns(columns: dict[str, str] | None) -> None:
    """A `columns` mapping must name our fields and the file's columns as strings."""
    for ours, theirs in (columns or {}).items():
        if ours not in COLUMNS + MESSAGE_KEYS:
            known = ", ".join(COLUMNS + MESSAGE_KEYS)
            raise DataError(f"columns: unknown field {ours!r} (expected one of {known})")
        if not isinstance(theirs, str) or not theirs.strip():
            raise DataError(f"columns: {ours}: got {theirs!r}, must be a column name")


def _rename(data: dict, columns: dict[str, str] | None) -> dict:
    """The row with the file's column names replaced by ours (a mapped column wins over one
    already named like ours)."""
    if not columns:
        return data
    top = {theirs: ours for ours, theirs in columns.items() if ours in COLUMNS}
    inner = {theirs: ours for ours, theirs in columns.items() if ours in MESSAGE_KEYS}
    out = {k: v for k, v in data.items() if k not in top and k not in top.values()}
    out.update({top[k]: v for k, v in data.items() if k in top})
    if inner:
        for key in ("messages", "conversations"):
            if isinstance(out.get(key), list):
                out[key] = [_rename_message(m, inner) for m in out[key]]
    return out


def _rename_message(message: object, inner: dict[str, str]) -> object:
    if not isinstance(message, dict):
        return message
    out = {k: v for k, v in message.items() if k not in inner and k not in inner.values()}
    out.update({inner[k]: v for k, v in message.items() if k in inner})
    return out


def _refuse_other_encodings(path: Path, raw: bytes) -> None:
    """UTF-16/32 (with or without a byte-order mark) in one line, instead of every row failing
    and the format check reporting "no columns"."""
    for bom, name in _BOMS:
        if raw.startswith(bom):
            marks = " ".join(f"{b:02X}" for b in bom)
            raise DataError(
                f"{path}: the file is {name} (byte-order mark {marks}), not UTF-8; save it as UTF-8"
            )
    head = raw[:512]
    if len(head) >= 8 and b"\x00" in head:
        # ASCII text in UTF-16 has a NUL in every other byte: odd positions for LE, even for BE.
        odd, even = head[1::2].count(0), head[0::2].count(0)
        half = len(head) // 2
        name = "UTF-16 LE" if odd > 0.8 * half and not even else None
        name = "UTF-16 BE" if even > 0.8 * half and not odd else name
        if name:
            raise DataError(
                f"{path}: the file looks like {name} (no byte-order mark; NUL every other "
                "byte), not UTF-8; save it as UTF-8"
            )


class _Text:
    """The decoded file with what non-UTF-8 bytes need to be reported: line, column, and the
    offset in the file's bytes (undecodable bytes are kept as surrogates)."""

    def __init__(self, text: str, base: int = 0):
        self.text, self.base = text, base
        self._starts: list[int] | None = None
        self._cursor = (0, base)  # (character index, its byte offset): readers go forward

    def line_start(self, line: int) -> int:
        """Index of the first character of a 1-based line."""
        starts = self.line_starts()
        return starts[line - 1] if line <= len(starts) else len(self.text)

    def line_starts(self) -> list[int]:
        """Index of the first character of each line."""
        if self._starts is None:
            self._starts = [0] + [m.end() for m in re.finditer("\n", self.text)]
        return self._starts

    def _offset(self, i: int) -> int:
        char, byte = self._cursor if i >= self._cursor[0] else (0, self.base)
        byte += len(self.text[char:i].encode("utf-8", errors="surrogateescape"))
        self._cursor = (i, byte)
        return byte

    def bad_byte(self, where: str, lo: int, hi: int) -> Issue | None:
        """An issue naming the first undecodable byte in text[lo:hi], or None."""
        m = _SURROGATE.search(self.text, lo, hi)
        if m is None:
            return None
        i = m.start()
        line = bisect_right(self.line_starts(), i)
        column = i - self.line_starts()[line - 1] + 1
        return Issue(
            where,
            f"not valid UTF-8 (byte 0x{ord(m.group()) - 0xDC00:02x} at line {line}, column "
            f"{column}, file offset {self._offset(i)}); save the file as UTF-8",
        )


def _read_jsonl(path: Path, text: _Text) -> list[Row]:
    rows, start = [], 0
    for number, line in enumerate(text.text.split("\n"), start=1):
        lo, start = start, start + len(line) + 1
        if not line.strip():
            continue  # blank lines are not rows
        row = Row(f"{path}:{number}", line)
        issue = text.bad_byte(row.where, lo, lo + len(line))
        if issue is None:
            try:
                row.data = json.loads(line)
            except json.JSONDecodeError as e:
                issue = Issue(row.where, f"invalid JSON ({json_error(e)})")
            except RecursionError:
                issue = Issue(row.where, f"invalid JSON ({TOO_DEEP})")
        if issue:
            row.issues.append(issue)
        rows.append(row)
    return rows


# Python's JSON reader recurses once per level of nesting; no dataset format nests this deep.
TOO_DEEP = (
    "nested too deeply: lists or objects inside each other hundreds of levels down; no "
    "dataset format nests like this, so check what wrote the file"
)


def json_error(e: json.JSONDecodeError) -> str:
    """json's message and column, in one phrase ("Invalid control character at column 14"):
    some of its messages end in "at" (they expect a position after them)."""
    text = f"{e.msg.removesuffix(' at')} at column {e.colno}"
    if e.msg.startswith("Invalid control character"):
        text += r"; a tab or line break inside a string must be written as \t or \n"
    return text


def _looks_like_json_lines(text: str) -> bool:
    """A .json file that is really JSON Lines (one object per line) is read as such."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return False
    first = stripped.split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _read_json_array(path: Path, text: _Text) -> list[Row]:
    """A JSON array of objects, parsed element by element so each row knows its line.

    A syntax error anywhere refuses the whole file (DataError naming its line and column): past
    it nothing can be read reliably, and keeping the rows before it would drop the rest silently
    (a missing comma in row 7 of 62 once trained on 6 rows)."""
    source, decoder, rows = text.text, json.JSONDecoder(), []

    def skip(i: int) -> int:
        while i < len(source) and source[i] in " \t\r\n":
            i += 1
        return i

    def line_col(i: int) -> tuple[int, int]:
        starts = text.line_starts()
        line = bisect_right(starts, i)
        return line, i - starts[line - 1] + 1

    def refuse(i: int, msg: str) -> DataError:
        line, col = line_col(i)
        return DataError(
            f"{path}:{line}:{col}: invalid JSON ({msg}): the whole file is unreadable "
            f"({plural(len(rows), 'row')} parsed before the error); fix it, or save one object "
            "per line (JSON Lines), where --skip-invalid can drop a bad line"
        )

    i = skip(0)
    if i >= len(source) or source[i] != "[":
        line, _ = line_col(i)
        raise DataError(f"{path}:{line}: expected a JSON array of objects ([{{...}}, ...])")
    i = skip(i + 1)
    if i < len(source) and source[i] == "]":
        return rows
    while True:
        try:
            value, end = decoder.raw_decode(source, i)
        except json.JSONDecodeError as e:
            raise refuse(e.pos, f"{e.msg.removesuffix(' at')} in row {len(rows) + 1}") from None
        except RecursionError:
            raise refuse(i, f"row {len(rows) + 1} is {TOO_DEEP}") from None
        where = f"{path}:{line_col(i)[0]}"
        row = Row(where, source[i:end], value)
        issue = text.bad_byte(where, i, end)
        if issue:
            row.issues.append(issue)
        rows.append(row)
        i = skip(end)
        if i < len(source) and source[i] == ",":
            i = skip(i + 1)
        elif i < len(source) and source[i] == "]":
            if skip(i + 1) < len(source):
                raise refuse(skip(i + 1), "text after the closing ']'")
            return rows
        else:
            raise refuse(i, f"expected ',' or ']' after row {len(rows)}")


def _read_csv(path: Path, text: _Text) -> list[Row]:
    reader = csv.reader(io.StringIO(text.text, newline=""))
    rows, start = [], 1
    try:
        try:
            header = next(reader)
        except StopIteration:
            return []
        header = [h.strip() for h in header]
        start = reader.line_num + 1
        for values in reader:
            where = f"{path}:{start}"
            raw = ",".join(values)
            first, start = start, reader.line_num + 1
            if not any(v.strip() for v in values):
                continue
            row = Row(where, raw)
            issue = text.bad_byte(where, text.line_start(first), text.line_start(start))
            if issue is None and len(values) != len(header):
                issue = Issue(where, f"has {len(values)} columns, the header has {len(header)}")
            if issue:
                row.issues.append(issue)
            else:
                row.data = dict(zip(header, values, strict=True))
            rows.append(row)
    except csv.Error as e:  # one line for the whole file: past it nothing reads reliably
        raise DataError(
            f"{path}:{start}: not readable as CSV ({e}): a quote left open (it runs on to the "
            f"end of the file), or a value longer than {csv.field_size_limit()} characters; "
            "fix the file, or save it as JSON Lines"
        ) from None
    return rows


def _decode_csv_lists(row: Row) -> None:
    """A list-valued column in CSV is JSON text; decode it so the format checks apply."""
    for key in _LIST_COLUMNS:
        value = row.data.get(key)
        if isinstance(value, str) and value.strip():
            try:
                row.data[key] = json.loads(value)
            except json.JSONDecodeError as e:
                row.issues.append(Issue(row.where, f"not valid JSON ({json_error(e)})", key))
            except RecursionError:
                row.issues.append(Issue(row.where, f"not valid JSON ({TOO_DEEP})", key))


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


def detect_format(rows: list[Row], where: str, formats: tuple | None = None) -> str:
    """The format whose signature columns most rows have. formats: the DataFormats to choose
    from (default: the SFT ones, `--format auto`); ties go to the first in detection order."""
    candidates = sorted(formats or SFT_FORMATS, key=lambda f: f.priority)
    votes: Counter[str] = Counter()
    columns: set[str] = set()
    for row in rows:
        if isinstance(row.data, dict):
            columns.update(row.data)
            for fmt in candidates:
                if all(k in row.data for k in fmt.signature):
                    votes[fmt.name] += 1
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
        expected = or_list([f.hint for f in candidates])
        raise DataError(
            f"{where}: cannot tell the format from the columns ({found}); expected {expected} "
            "— or pass --format, or map your columns"
        )
    return max((f.name for f in candidates), key=lambda name: votes[name])


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


def check_roles(roles: dict[str, str] | None) -> None:
    """A `roles` mapping must map names to system, user or assistant."""
    for theirs, ours in (roles or {}).items():
        if ours not in ROLES:
            raise DataError(f"roles: {theirs}: got {ours!r}, must be one of {', '.join(ROLES)}")


def _turns(
    data: dict, key: str, where: str, issues: list[Issue], known: dict[str, str]
) -> list[dict] | None:
    """The list of turns under `key` as clean messages ({"role", "content"}, plus "weight": 0 on
    an assistant turn that is context only), or None with issues.

    Messages are {"role", "content"}; under `conversations` (ShareGPT) {"from", "value"} too.
    `known` maps every accepted role name to ours."""
    if key not in data:
        issues.append(Issue(where, "missing field", key))
        return None
    turns = data[key]
    if not isinstance(turns, list):
        issues.append(Issue(where, f"wrong type: expected an array of messages, got "
                                   f"{_type_name(turns)}", key))  # fmt: skip
        return None
    if not turns:
        issues.append(Issue(where, "empty conversation", key))
        return None
    clean, before = [], len(issues)
    for i, message in enumerate(turns):
        name = f"{key}[{i}]"
        if not isinstance(message, dict):
            got = _type_name(message)
            issues.append(Issue(where, f"wrong type: expected an object, got {got}", name))
            continue
        sharegpt = key == "conversations" and "role" not in message and "content" not in message
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        role = known.get(message.get(role_key)) if isinstance(message.get(role_key), str) else None
        if role_key not in message:
            issues.append(Issue(where, "missing field", f"{name}.{role_key}"))
        elif role is None and message[role_key] in TOOL_ROLES:
            msg = (
                f"tool turn {message[role_key]!r} is not supported (the chat template has no "
                "tool role); drop the row or map the role with `roles`"
            )
            issues.append(Issue(where, msg, f"{name}.{role_key}"))
        elif role is None:
            expected = ", ".join(dict.fromkeys(known))
            msg = (
                f"unknown role {message[role_key]!r} (expected {expected}, or map it with `roles`)"
            )
            issues.append(Issue(where, msg, f"{name}.{role_key}"))
        what = "empty completion" if role == "assistant" else "empty message"
        content = message.get(content_key)
        if content_key not in message:
            issues.append(Issue(where, "missing field", f"{name}.{content_key}"))
        elif not isinstance(content, str):
            msg = f"wrong type: expected a string, got {_type_name(content)}"
            issues.append(Issue(where, msg, f"{name}.{content_key}"))
        elif not content.strip():
            issues.append(Issue(where, what, f"{name}.{content_key}"))
        turn = {"role": role, "content": content}
        weight = _weight(message, role, f"{name}.weight", where, issues)
        if weight == 0:
            turn["weight"] = 0  # only the exception is recorded: absent means trained
        clean.append(turn)
    if len(issues) > before:
        return None
    return clean


def _weight(message: dict, role: str | None, name: str, where: str, issues: list[Issue]):
    """OpenAI's per-message weight: 0 (context only) or 1 (trained), assistant turns only."""
    if "weight" not in message or message["weight"] is None:
        return 1
    weight = message["weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        issues.append(Issue(where, f"got {weight!r}, must be 0 or 1", name))
        return None
    if role is not None and role != "assistant":  # an unknown role is reported already
        issues.append(Issue(where, "only assistant turns have a weight", name))
        return None
    return int(weight)


def _usable_conversation(clean: list[dict], key: str, where: str, issues: list[Issue]) -> bool:
    """The checks every conversation passes: ends with an answer, has a question, trains on
    something. False (with an issue) if not."""
    if clean[-1]["role"] != "assistant":
        msg = f"the last turn is {clean[-1]['role']!r}: a conversation must end with an assistant turn"
        issues.append(Issue(where, msg, key))
        return False
    if all(m["role"] == "assistant" for m in clean):
        issues.append(Issue(where, "no user turn before the assistant's answer", key))
        return False
    if all(m.get("weight") == 0 for m in clean if m["role"] == "assistant"):
        issues.append(Issue(where, "every assistant turn has weight 0: nothing to train on", key))
        return False
    return True


def _history(data: dict, where: str, issues: list[Issue]) -> list[dict] | None:
    """Alpaca `history`: [[instruction, response], ...] before the current turn, as messages."""
    history = data.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        got = _type_name(history)
        issues.append(Issue(where, f"wrong type: expected an array of pairs, got {got}", "history"))
        return None
    turns, before = [], len(issues)
    for i, pair in enumerate(history):
        name = f"history[{i}]"
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"{len(pair)} items" if isinstance(pair, list) else _type_name(pair)
            msg = f"expected an [instruction, response] pair, got {got}"
            issues.append(Issue(where, msg, name))
            continue
        for j, (role, text) in enumerate(zip(("user", "assistant"), pair, strict=True)):
            if not isinstance(text, str):
                msg = f"wrong type: expected a string, got {_type_name(text)}"
                issues.append(Issue(where, msg, f"{name}[{j}]"))
            elif not text.strip():
                issues.append(Issue(where, "empty message", f"{name}[{j}]"))
            else:
                turns.append({"role": role, "content": text})
    return None if len(issues) > before else turns


def to_conversation(
    data: object,
    fmt: str,
    where: str,
    roles: dict[str, str] | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[list[dict] | str | None, list]:
    """A row as messages (or plain text for the text format), plus its issues.

    roles: extra role names ({"bot": "assistant"}), for messages and sharegpt. columns: the
    mapping the row was read with (`read_rows`), so issues name the file's own columns."""
    issues: list[Issue] = []
    conversation = _convert(data, fmt, where, issues, roles or {})
    if columns:
        for issue in issues:
            issue.field = _file_field(issue.field, columns)
    return conversation, issues


def _convert(data: object, fmt: str, where: str, issues: list[Issue], roles: dict[str, str]):
    if not isinstance(data, dict):
        issues.append(Issue(where, f"expected a JSON object, got {_type_name(data)}"))
        return None
    spec = next((f for f in SFT_FORMATS if f.name == fmt), None)
    if spec is None:
        raise DataError(f"unknown format {fmt!r} (expected {', '.join(FORMATS)} or auto)")
    return spec.convert(data, where, issues, roles)


def _text(data: dict, where: str, issues: list[Issue], roles: dict[str, str]) -> str | None:
    return _string(data, "text", where, issues)


def _messages(data: dict, where: str, issues: list[Issue], roles: dict[str, str]):
    clean = _turns(data, "messages", where, issues, {**{r: r for r in ROLES}, **roles})
    return clean if clean and _usable_conversation(clean, "messages", where, issues) else None


def _sharegpt(data: dict, where: str, issues: list[Issue], roles: dict[str, str]):
    system = _string(data, "system", where, issues, required=False)
    clean = _turns(data, "conversations", where, issues, {**SHAREGPT_ROLES, **roles})
    if clean is None or system is None:
        return None
    if system.strip():
        if clean[0]["role"] == "system" and clean[0]["content"] != system:
            msg = "a system turn and a different top-level system: keep one"
            issues.append(Issue(where, msg, "system"))
            return None
        if clean[0]["role"] != "system":
            clean = [{"role": "system", "content": system}, *clean]
    return clean if _usable_conversation(clean, "conversations", where, issues) else None


def _alpaca(data: dict, where: str, issues: list[Issue], roles: dict[str, str]):
    instruction = _string(data, "instruction", where, issues)
    extra = _string(data, "input", where, issues, required=False)
    system = _string(data, "system", where, issues, required=False)
    history = _history(data, where, issues)
    output = _string(data, "output", where, issues, what="empty completion")
    if issues:
        return None
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    conversation = [{"role": "system", "content": system}] if system else []
    return [
        *conversation,
        *history,
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]


def _prompt_completion(data: dict, where: str, issues: list[Issue], roles: dict[str, str]):
    prompt = _string(data, "prompt", where, issues)
    completion = _string(data, "completion", where, issues, what="empty completion")
    if issues:
        return None
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": completion},
    ]


def _preference(data: dict, where: str, issues: list[Issue], roles: dict[str, str]):
    """A prompt/chosen/rejected row as TRL's conversational pair: {"prompt": [messages],
    "chosen": [assistant messages], "rejected": [...]} (roles are not mapped: fixed layout)."""
    keys = PREFERENCE.signature
    pair = {}
    for key in keys:
        if key not in data:
            issues.append(Issue(where, f"missing (a preference row needs {', '.join(keys)})", key))
            return None
        pair[key], reason = _preference_turns(data[key], answer=key != "prompt")
        if reason:
            issues.append(Issue(where, reason, key))
            return None
    if pair["chosen"] == pair["rejected"]:
        msg = "the same as rejected (a pair must prefer one answer to another)"
        issues.append(Issue(where, msg, "chosen"))
        return None
    return pair


def _preference_turns(value: object, answer: bool) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a usable prompt or answer, else (None, reason)."""
    if isinstance(value, str):
        if not value.strip():
            return None, "empty"
        return [{"role": "assistant" if answer else "user", "content": value}], None
    if not isinstance(value, list) or not value:
        return None, f"must be a non-empty string or a list of messages, got {type(value).__name__}"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            return None, f"message {i}: must be an object with role and content"
        if m["role"] not in ROLES:
            return None, f"message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return None, f"message {i}: empty content"
        out.append({"role": m["role"], "content": m["content"]})
    if answer and any(m["role"] != "assistant" for m in out):
        return None, "answer messages must all be assistant turns"
    if not answer and out[-1]["role"] != "user":
        return None, f"the last prompt message must be a user turn, got {out[-1]['role']}"
    return out, None


def _file_field(name: str | None, columns: dict[str, str]) -> str | None:
    """An issue's field in the file's own names: "messages[1].content" -> "dialog[1].text"."""
    if not name:
        return name
    head, dot, inner = name.partition(".")
    base, bracket, index = head.partition("[")
    base = columns.get(base, base) if base in COLUMNS else base
    if dot:
        inner = columns.get(inner, inner) if inner in MESSAGE_KEYS else inner
    return f"{base}{bracket}{index}{dot}{inner}"


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


# ---------------------------------------------------------------------------------------------
# The formats: one table (detection, --format's help and the dashboard read it)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFormat:
    """One row layout a dataset may use."""

    name: str  # what --format takes
    columns: tuple[str, ...]  # every top-level column it reads, in the order documented
    signature: tuple[str, ...]  # the columns that identify it (auto-detection)
    description: str  # one line for people: what each column holds
    example: dict  # a row in this format (shown on the dashboard, checked by the tests)
    # (row, where, issues, roles) -> the converted row, or None with issues appended
    convert: Callable[[dict, str, list[Issue], dict[str, str]], object]
    priority: int  # detection order when a row has several signatures (specific first)
    known_as: str = ""  # another name, shown in --format's help
    method: str = "sft"  # "sft" (lora, qlora: --format) or "dpo" (preference pairs)

    @property
    def optional(self) -> tuple[str, ...]:
        """The columns a row may leave out."""
        return tuple(c for c in self.columns if c not in self.signature)

    @property
    def label(self) -> str:
        """The name with its other name: "messages (OpenAI chat)"."""
        return f"{self.name} ({self.known_as})" if self.known_as else self.name

    @property
    def hint(self) -> str:
        """Its signature, as a detection error names it: "instruction+output (alpaca)"."""
        columns = "+".join(self.signature)
        same = "_".join(self.signature) == self.name
        return columns if same else f"{columns} ({self.name})"


DATA_FORMATS = (
    DataFormat(
        "alpaca",
        ("instruction", "input", "output", "system", "history"),
        ("instruction", "output"),
        "instruction, optional input, system and history (a list of [instruction, response] "
        "pairs: the earlier turns of the conversation), output",
        {"instruction": "Name a prime number.", "input": "", "output": "7"},
        _alpaca,
        priority=2,
    ),
    DataFormat(
        "messages",
        ("messages",),
        ("messages",),
        'messages, a list of {"role", "content"} ending with an assistant turn (an assistant '
        'message with "weight": 0 is context only, not trained on)',
        {
            "messages": [
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        _messages,
        priority=0,
        known_as="OpenAI chat",
    ),
    DataFormat(
        "sharegpt",
        ("conversations", "system"),
        ("conversations",),
        'conversations, a list of {"from", "value"} (from: human/user, gpt/assistant/model, '
        "system), optional top-level system",
        {
            "conversations": [
                {"from": "human", "value": "Say hi."},
                {"from": "gpt", "value": "Hi!"},
            ]
        },
        _sharegpt,
        priority=1,
    ),
    DataFormat(
        "prompt_completion",
        ("prompt", "completion"),
        ("prompt", "completion"),
        "prompt, completion",
        {"prompt": "The capital of France is", "completion": " Paris."},
        _prompt_completion,
        priority=3,
    ),
    DataFormat(
        "text",
        ("text",),
        ("text",),
        "text (plain language modelling: every token is trained on)",
        {"text": "A LoRA adapter adds two small matrices to a frozen layer."},
        _text,
        priority=4,
    ),
    DataFormat(
        "preference",
        ("prompt", "chosen", "rejected"),
        ("prompt", "chosen", "rejected"),
        "prompt, chosen, rejected: strings, or a prompt that is a list of "
        '{"role", "content"} messages and answers that are lists of assistant messages',
        {"prompt": "Explain LoRA briefly.", "chosen": "Low-rank adapters.", "rejected": "No."},
        _preference,
        priority=5,
        method="dpo",
    ),
)
SFT_FORMATS = tuple(f for f in DATA_FORMATS if f.method == "sft")
FORMATS = tuple(f.name for f in SFT_FORMATS)  # what --format takes, besides auto
PREFERENCE = next(f for f in DATA_FORMATS if f.method == "dpo")
# Field names a `columns` mapping may rename to: top-level columns, then keys inside a message.
COLUMNS = tuple(
    dict.fromkeys(c for f in sorted(SFT_FORMATS, key=lambda f: f.priority) for c in f.columns)
)


def or_list(items: list[str]) -> str:
    """ "a, b or c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def format_help() -> str:
    """`--format`'s help: auto and every SFT format."""
    return f"auto, {or_list([f.label for f in SFT_FORMATS])}."


# ---------------------------------------------------------------------------------------------
# Preference rows (--method dpo)
# ---------------------------------------------------------------------------------------------


class PreferenceDataError(DataError):
    """A preference file that cannot be trained on; one line naming file:line and the key."""


def check_preference_row(row: Row) -> tuple[dict | None, str | None]:
    """(the row as TRL conversational messages, None), or (None, "key: reason")."""
    if not row.ok:
        return None, row.issues[0].reason
    if not isinstance(row.data, dict):
        return None, f"expected an object with {', '.join(PREFERENCE.signature)}"
    issues: list[Issue] = []
    pair = PREFERENCE.convert(row.data, row.where, issues, {})
    return (None, issues[0].reason) if issues else (pair, None)


def read_preferences(path: str | Path, skip_invalid: bool = False, echo=print) -> list[dict]:
    """Every usable pair of a .jsonl/.json/.csv/.parquet file; the first bad row stops it
    (PreferenceDataError "file:line: key: reason"), unless skip_invalid drops bad rows."""
    pairs, bad = [], []
    for row in read_rows(path):
        pair, reason = check_preference_row(row)
        if reason:
            bad.append(f"{row.where}: {reason}")
        else:
            pairs.append(pair)
    if bad and not skip_invalid:
        more = f" (and {plural(len(bad) - 1, 'more invalid row')})" if len(bad) > 1 else ""
        raise PreferenceDataError(f"{bad[0]}{more}; fix it, or pass --skip-invalid")
    if bad:
        echo(f"{path}: skipped {plural(len(bad), 'invalid row')}, the first: {bad[0]}")
    if not pairs:
        keys = ", ".join(PREFERENCE.signature)
        raise PreferenceDataError(f"{path}: no usable preference rows ({keys})")
    return pairs
