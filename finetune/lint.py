"""The pre-flight check (`genai-lab finetune --check`, and the first thing every run does): read
every row before any model loads, report each bad row as `file:line: field: reason`, show token
statistics and one rendered example with the trained tokens marked.

Without `--skip-invalid` any bad row stops the run; with it the bad rows go to `rejects.jsonl`
with their reasons, and the counts are printed. Warnings (duplicates) never stop a run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data import DataError, Issue, Row, detect_format, mark_duplicates, read_rows
from finetune.data import to_conversation as row_to_conversation
from finetune.render import Encoded, RenderError, encode, preview

MAX_PRINTED_ISSUES = 50


@dataclass
class DatasetCheck:
    """One data file after checking: every row with its issues, and the encoded good rows."""

    path: str
    format: str
    detected: bool  # format auto-detected (vs given)
    rows: list[Row]
    conversations: list = field(default_factory=list)  # per good row
    examples: list[Encoded] = field(default_factory=list)  # per good row
    good_rows: list[Row] = field(default_factory=list)
    max_length: int | None = None
    over_length: int = 0  # rows longer than max_length (rejected, or truncated with --truncate)

    @property
    def issues(self) -> list[Issue]:
        return [i for row in self.rows for i in row.issues]

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def bad_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]


def check_structure(path: str | Path, fmt: str = "auto") -> tuple[DatasetCheck, list]:
    """Read every row and check its JSON, format and fields, without a tokenizer (what
    `--dry-run` checks: it loads nothing of the model). Returns the check (no encoded rows yet)
    and each row's conversation (None for a bad row)."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows (an empty file?)")
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(rows, str(path))
    check = DatasetCheck(str(path), fmt, detected, rows)
    conversations = []
    for row in rows:
        conversation = None
        if row.ok:
            conversation, issues = row_to_conversation(row.data, fmt, row.where)
            row.issues.extend(issues)
        conversations.append(conversation)
    mark_duplicates(rows, conversations)
    return check, conversations


def lint_structure(
    files: list[str], fmt: str, skip_invalid: bool, echo: Callable[[str], None]
) -> list[DatasetCheck]:
    """`--dry-run`'s data check: every row of every file parsed and checked against the format,
    bad rows listed; stops (DataError) on bad rows unless skip_invalid, or when no row is usable.
    Token counts need the tokenizer: that is `--check`."""
    checks = []
    for path in files:
        check, _ = check_structure(path, fmt)
        check.good_rows = [row for row in check.rows if row.ok]
        how = "auto-detected" if check.detected else "given"
        echo(
            f"{check.path}: {len(check.rows)} rows, format {check.format} ({how}): "
            f"{len(check.good_rows)} well-formed, {len(check.bad_rows)} with errors"
        )
        checks.append(check)
    for line in issue_lines(checks):
        echo(line)
    enforce(checks, skip_invalid, None, echo)
    return checks


def check_file(
    path: str | Path,
    tokenizer,
    fmt: str = "auto",
    max_length: int | None = None,
    truncate: bool = False,
    train_on_prompt: bool = False,
) -> DatasetCheck:
    check, conversations = check_structure(path, fmt)
    check.max_length = max_length
    for row, conversation in zip(check.rows, conversations, strict=True):
        if not row.ok:
            continue
        try:
            encoded = encode(tokenizer, conversation, train_on_prompt)
        except RenderError as e:
            row.issues.append(Issue(row.where, str(e)))
            continue
        if max_length is not None and len(encoded.input_ids) > max_length:
            check.over_length += 1
            message = f"{len(encoded.input_ids)} tokens, longer than max_length {max_length}"
            if not truncate:
                row.issues.append(Issue(row.where, message + " (raise --max-length or --truncate)"))
                continue
            row.issues.append(Issue(row.where, message + ": truncated", severity="warning"))
            encoded = Encoded(encoded.input_ids[:max_length], encoded.trained[:max_length])
        if encoded.num_trained == 0:
            row.issues.append(Issue(row.where, "no tokens left to train on after truncation"))
            continue
        check.good_rows.append(row)
        check.conversations.append(conversation)
        check.examples.append(encoded)
    return check


def token_stats(examples: list[Encoded]) -> dict:
    lengths = sorted(len(e.input_ids) for e in examples)
    trained = [e.num_trained for e in examples]
    if not lengths:
        return {"rows": 0}
    return {
        "rows": len(lengths),
        "min": lengths[0],
        "median": statistics.median(lengths),
        "mean": statistics.fmean(lengths),
        "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max": lengths[-1],
        "tokens": sum(lengths),
        "trained_tokens": sum(trained),
    }


def report_lines(check: DatasetCheck, tokenizer, color: bool = False) -> list[str]:
    """The human summary of one checked file (issues are printed separately)."""
    how = "auto-detected" if check.detected else "given"
    errors, warnings = len(check.bad_rows), sum(i.severity == "warning" for i in check.issues)
    lines = [
        f"{check.path}: {len(check.rows)} rows, format {check.format} ({how}): "
        f"{len(check.examples)} usable, {errors} with errors, {warnings} warnings"
    ]
    stats = token_stats(check.examples)
    if stats["rows"]:
        share = 100 * stats["trained_tokens"] / stats["tokens"]
        lines.append(
            f"  tokens per row: min {stats['min']}, median {stats['median']:g}, "
            f"mean {stats['mean']:.1f}, p95 {stats['p95']}, max {stats['max']}; "
            f"{stats['trained_tokens']} of {stats['tokens']} tokens trained on ({share:.0f}%)"
        )
    if check.max_length is not None:
        lines.append(
            f"  max_length {check.max_length}: {check.over_length} rows longer "
            "(these would be truncated)"
        )
    if check.examples:
        example = check.examples[0]
        marks = "in green" if color else "between « »"
        lines.append(
            f"  preview of {check.good_rows[0].where} (trained tokens {marks}: "
            f"{example.num_trained} of {len(example.input_ids)}):"
        )
        lines += ["    " + line for line in preview(tokenizer, example, color).split("\n")]
    return lines


def issue_lines(checks: list[DatasetCheck], limit: int = MAX_PRINTED_ISSUES) -> list[str]:
    issues = [str(i) for check in checks for i in check.issues]
    if len(issues) <= limit:
        return issues
    return [*issues[:limit], f"... and {len(issues) - limit} more"]


def write_rejects(checks: list[DatasetCheck], path: Path) -> int:
    """Every bad row with its reasons, one JSON object per line; returns how many."""
    bad = [row for check in checks for row in check.bad_rows]
    if not bad:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in bad:
            reasons = [i.reason for i in row.issues if i.severity == "error"]
            f.write(json.dumps({"where": row.where, "errors": reasons, "row": row.raw}) + "\n")
    return len(bad)


def enforce(checks: list[DatasetCheck], skip_invalid: bool, rejects: Path | None, echo) -> None:
    """Stop on bad rows, or (with skip_invalid) set them aside and say how many."""
    bad = sum(len(c.bad_rows) for c in checks)
    if bad and not skip_invalid:
        files = ", ".join(c.path for c in checks if c.bad_rows)
        raise DataError(
            f"{bad} invalid rows in {files} (listed above); fix them, or pass --skip-invalid "
            "to train without them"
        )
    if bad and rejects is not None:
        write_rejects(checks, rejects)
        kept = sum(len(c.good_rows) for c in checks)
        echo(f"skipped {bad} invalid rows (written to {rejects}); training on {kept} rows")
    for check in checks:
        if not check.good_rows:
            raise DataError(f"{check.path}: no usable rows")
