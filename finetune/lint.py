"""The pre-flight check (`genai-lab finetune --check`, and the first thing every run does): read
every row before any model loads, report each bad row as `file:line: field: reason`, show token
statistics and one rendered example with the trained tokens marked.

Without `--skip-invalid` any bad row stops the run; with it the bad rows go to `rejects.jsonl`
with their reasons, and the counts are printed, unless more than MAX_REJECTED_SHARE of a file's
rows are bad (then the data is wrong, not a few rows: the run stops). Warnings (duplicates) never
stop a run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data import (
    DataError,
    Issue,
    Row,
    check_roles,
    detect_format,
    mark_duplicates,
    plural,
    read_rows,
)
from finetune.data import to_conversation as row_to_conversation
from finetune.render import Encoded, RenderError, encode_many, preview

MAX_PRINTED_ISSUES = 50
ENCODE_BATCH = 1000  # rows rendered, then tokenized in one call; progress is reported per batch
# Files with at least this many rows get a progress bar while they are encoded (~0.3 ms a row on
# one core: a bar from a few seconds of work on).
PROGRESS_MIN_ROWS = 10_000
# Above this share of bad rows in a file, --skip-invalid refuses: the file was read wrongly (wrong
# format, encoding, column names) or is broken, and training on the remainder would hide it.
MAX_REJECTED_SHARE = 0.10


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
    truncate: bool = False
    over_lengths: list[int] = field(default_factory=list)  # token counts of rows > max_length
    cut_empty: int = 0  # truncated rows rejected because no answer token was left

    @property
    def over_length(self) -> int:
        """Rows longer than max_length (rejected, or truncated with truncate)."""
        return len(self.over_lengths)

    @property
    def issues(self) -> list[Issue]:
        return [i for row in self.rows for i in row.issues]

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def bad_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]


def check_structure(
    path: str | Path,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    roles: dict[str, str] | None = None,
) -> tuple[DatasetCheck, list]:
    """Read every row and check its JSON, format and fields, without a tokenizer (what
    `--dry-run` checks: it loads nothing of the model). Returns the check (no encoded rows yet)
    and each row's conversation (None for a bad row). columns / roles: see finetune.data."""
    check_roles(roles)
    rows = read_rows(path, columns)
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
            conversation, issues = row_to_conversation(row.data, fmt, row.where, roles, columns)
            row.issues.extend(issues)
        conversations.append(conversation)
    mark_duplicates(rows, conversations)
    return check, conversations


def lint_structure(
    files: list[str],
    fmt: str,
    skip_invalid: bool,
    echo: Callable[[str], None],
    columns: dict[str, str] | None = None,
    roles: dict[str, str] | None = None,
) -> list[DatasetCheck]:
    """`--dry-run`'s data check: every row of every file parsed and checked against the format,
    bad rows listed; stops (DataError) on bad rows unless skip_invalid, or when no row is usable.
    Token counts need the tokenizer: that is `--check`."""
    checks = []
    for path in files:
        check, _ = check_structure(path, fmt, columns, roles)
        check.good_rows = [row for row in check.rows if row.ok]
        how = "auto-detected" if check.detected else "given"
        echo(
            f"{check.path}: {plural(len(check.rows), 'row')}, format {check.format} ({how}): "
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
    columns: dict[str, str] | None = None,
    roles: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetCheck:
    """check_structure, then every well-formed row rendered, tokenized and held to max_length.
    progress(rows done, rows) is called after each batch of ENCODE_BATCH rows."""
    check, conversations = check_structure(path, fmt, columns, roles)
    check.max_length, check.truncate = max_length, truncate
    todo = [(row, c) for row, c in zip(check.rows, conversations, strict=True) if row.ok]
    if progress is not None:
        progress(0, len(todo))
    for first in range(0, len(todo), ENCODE_BATCH):
        batch = todo[first : first + ENCODE_BATCH]
        encoded_rows = encode_many(tokenizer, [c for _, c in batch], train_on_prompt)
        for (row, conversation), encoded in zip(batch, encoded_rows, strict=True):
            _hold_to_length(check, row, conversation, encoded, train_on_prompt)
        if progress is not None:
            progress(first + len(batch), len(todo))
    return check


def _hold_to_length(
    check: DatasetCheck, row: Row, conversation, encoded: Encoded | RenderError, train_on_prompt
) -> None:
    """Record one encoded row: rejected (render error, too long, nothing to train on),
    truncated with a warning, or kept."""
    if isinstance(encoded, RenderError):
        row.issues.append(Issue(row.where, str(encoded)))
        return
    max_length = check.max_length
    cut = max_length is not None and len(encoded.input_ids) > max_length
    if cut:
        check.over_lengths.append(len(encoded.input_ids))
        message = f"{len(encoded.input_ids)} tokens, longer than max_length {max_length}"
        if not check.truncate:
            row.issues.append(Issue(row.where, message + " (raise --max-length or --truncate)"))
            return
        row.issues.append(Issue(row.where, message + ": truncated", severity="warning"))
        encoded = Encoded(encoded.input_ids[:max_length], encoded.trained[:max_length])
    if encoded.num_trained == 0:
        why = "after truncation" if cut else "(every answer is masked)"
        row.issues.append(Issue(row.where, f"no tokens left to train on {why}"))
        check.cut_empty += cut
        return
    check.good_rows.append(row)
    check.conversations.append(conversation)
    check.examples.append(encoded)


def progress_bar(path: str | Path) -> Callable[[int, int], None]:
    """A check_file progress callback drawing a tqdm bar on stderr for large files (none for
    files under PROGRESS_MIN_ROWS rows, which take a moment)."""
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if total < PROGRESS_MIN_ROWS:
            return
        if bar is None:
            bar = tqdm(total=total, desc=f"checking {Path(path).name}", unit="row")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


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
        f"{check.path}: {plural(len(check.rows), 'row')}, format {check.format} ({how}): "
        f"{len(check.examples)} usable, {errors} with errors, {plural(warnings, 'warning')}"
    ]
    stats = token_stats(check.examples)
    if stats["rows"]:
        share = 100 * stats["trained_tokens"] / stats["tokens"]
        # The stats cover what trains: the usable rows (truncated ones at their cut length),
        # never the rejected ones, so say so instead of a "max" below a rejected row's length.
        cover = f"the {plural(stats['rows'], 'usable row')}"
        if check.truncate and check.over_length:
            cover += ", after truncation"
        if errors:
            cover += ", rejected rows not counted"
        lines.append(
            f"  tokens per row ({cover}): min {stats['min']}, median {stats['median']:g}, "
            f"mean {stats['mean']:.1f}, p95 {stats['p95']}, max {stats['max']}; "
            f"{stats['trained_tokens']} of {stats['tokens']} tokens trained on ({share:.0f}%)"
        )
    if check.max_length is not None:
        lines.append(f"  max_length {check.max_length}: {_over_length_summary(check)}")
    if check.examples:
        example = check.examples[0]
        marks = "in green" if color else "between « »"
        lines.append(
            f"  preview of {check.good_rows[0].where} (trained tokens {marks}: "
            f"{example.num_trained} of {len(example.input_ids)}):"
        )
        lines += ["    " + line for line in preview(tokenizer, example, color).split("\n")]
    return lines


def _over_length_summary(check: DatasetCheck) -> str:
    if not check.over_length:
        return "no row is longer"
    longest = max(check.over_lengths)
    size = f"{longest} tokens" if check.over_length == 1 else f"up to {longest} tokens"
    found = f"{plural(check.over_length, 'row')} longer ({size})"
    if not check.truncate:
        return f"{found}, rejected (raise --max-length or pass --truncate)"
    line = f"{found}, truncated to {check.max_length} tokens"
    if check.cut_empty:
        line += f"; {check.cut_empty} of them rejected: no answer token left after the cut"
    return line


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


def enforce(
    checks: list[DatasetCheck],
    skip_invalid: bool,
    rejects: Path | None,
    echo,
    max_rejected_share: float = MAX_REJECTED_SHARE,
) -> None:
    """Stop on bad rows, or (with skip_invalid) set them aside and say how many; stop anyway
    when more than max_rejected_share of a file's rows are bad."""
    bad = sum(len(c.bad_rows) for c in checks)
    if bad and not skip_invalid:
        files = ", ".join(c.path for c in checks if c.bad_rows)
        raise DataError(
            f"{plural(bad, 'invalid row')} in {files} (listed above); fix "
            f"{'it' if bad == 1 else 'them'}, or pass --skip-invalid to train without "
            f"{'it' if bad == 1 else 'them'}"
        )
    for check in checks:
        rejected, total = len(check.bad_rows), len(check.rows)
        if total and rejected / total > max_rejected_share:
            raise DataError(
                f"{check.path}: {rejected} of {plural(total, 'row')} invalid "
                f"({100 * rejected / total:.0f}%), more than the {100 * max_rejected_share:g}% "
                "--skip-invalid may drop; the file is broken or read wrongly (format, columns, "
                "encoding): fix it"
            )
    if bad and rejects is not None:
        write_rejects(checks, rejects)
        kept = sum(len(c.good_rows) for c in checks)
        total = sum(len(c.rows) for c in checks)
        echo(
            f"skipped {bad} of {plural(total, 'row')} as invalid (written to {rejects}); "
            f"keeping {plural(kept, 'row')}"
        )
    for check in checks:
        if not check.good_rows:
            raise DataError(f"{check.path}: no usable rows")
