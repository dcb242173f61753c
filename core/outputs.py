"""The one rule for what a command may write over: nothing of the user's is ever lost.

A command that writes a folder the user names (`merge --output`, `sft --output-dir`, ...) calls
`claim_output_folder` before any work:

- a missing or empty folder is used;
- a folder holding the command's own files (`own(path)`: a previous merge's config.json +
  merge_check.json, a run folder's config.yaml or checkpoints/) is used as the command always has
  (replaced, resumed, or refused by the command's own rules, e.g. checkpoints without --resume);
- any other non-empty folder is refused with one line naming it;
- with `overwrite`, a non-empty folder is moved aside to the visible sibling DIR.old-TIMESTAMP,
  and the command says so; nothing is ever deleted;
- a file where a folder is wanted is refused.

A command that writes a file (`bench --output`, `bot data --output`) calls `claim_output_file`:
an existing file is replaced only when it is the command's own kind (`own(path)`: a bench report,
a JSONL of chat rows) or empty; with `overwrite` another file is moved aside the same way; a
folder where a file is wanted is refused in one line naming it.

Torch-free, like core.atomic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from core.atomic import OutputError, _say, check_parent, move_aside

__all__ = [
    "OutputError",
    "claim_output_file",
    "claim_output_folder",
    "holds_all",
    "holds_any",
    "json_file_with_keys",
    "jsonl_file_of",
]

OVERWRITE_HELP = (
    "Start afresh: move what is already at the output aside to NAME.old-TIMESTAMP, and say so "
    "(nothing is deleted)."
)


def holds_all(*names: str) -> Callable[[Path], bool]:
    """`own` test: the folder holds every one of these entries (files or folders)."""
    return lambda folder: all((Path(folder) / n).exists() for n in names)


def holds_any(*names: str) -> Callable[[Path], bool]:
    """`own` test: the folder holds at least one of these entries (files or folders)."""
    return lambda folder: any((Path(folder) / n).exists() for n in names)


def _is_empty_folder(path: Path) -> bool:
    return not any(path.iterdir())


def claim_output_folder(
    path: str | Path,
    command: str,
    own: Callable[[Path], bool],
    *,
    overwrite: bool | None = False,
    flag: str = "--output",
    say: Callable[[str], None] = _say,
) -> Path | None:
    """Check (and with `overwrite`, clear) the folder `command` is about to write: see the module
    docstring. Returns where old content was moved, or None. Raises OutputError (one line);
    `overwrite` None: the command has no --overwrite flag, so the line does not offer one."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{path} is a broken link: pass another {flag}")
    if path.exists() and not path.is_dir():
        raise OutputError(
            f"{path} is a file, not a folder: pass another {flag} (a new or empty folder)"
        )
    check_parent(path)
    if not path.exists() or _is_empty_folder(path):
        return None
    if overwrite:
        return move_aside(path, say)
    if own(path):
        return None
    raise OutputError(
        f"{path} is not empty and was not written by genai-lab {command}: "
        + _instead(path, flag, overwrite)
    )


def claim_output_file(
    path: str | Path,
    command: str,
    own: Callable[[Path], bool],
    *,
    overwrite: bool | None = False,
    flag: str = "--output",
    say: Callable[[str], None] = _say,
) -> Path | None:
    """Check (and with `overwrite`, clear) the file `command` is about to write: see the module
    docstring. Returns where an old file was moved, or None. Raises OutputError (one line);
    `overwrite` None as for claim_output_folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder: {flag} wants a file name (e.g. {path / 'NAME'})")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{path} is a broken link: pass another {flag}")
    check_parent(path)
    if not path.exists():
        return None
    if not path.is_file():  # a device, a pipe: a rename would replace the special file itself
        raise OutputError(f"{path} is not a regular file: pass another {flag}")
    if path.stat().st_size == 0:
        return None
    if overwrite:
        return move_aside(path, say)
    if own(path):
        return None
    raise OutputError(
        f"{path} exists and was not written by genai-lab {command}: "
        + _instead(path, flag, overwrite)
    )


def _instead(path: Path, flag: str, overwrite: bool | None) -> str:
    if overwrite is None:
        return f"pass another {flag}, or move it away yourself"
    return (
        f"pass another {flag}, or --overwrite to move it aside (it is kept as {path}.old-TIMESTAMP)"
    )


# Own-kind tests for file outputs read at most this much (a bigger file is not one of ours).
_MAX_READ = 64 * 1024 * 1024
_MAX_LINE = 16 * 1024 * 1024


def json_file_with_keys(keys: Iterable[str]) -> Callable[[Path], bool]:
    """`own` test: a JSON object, not empty, whose every key is one of `keys`."""
    allowed = set(keys)

    def test(path: Path) -> bool:
        try:
            if path.stat().st_size > _MAX_READ:
                return False
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            return False
        return isinstance(data, dict) and bool(data) and set(data) <= allowed

    return test


def jsonl_file_of(row: Callable[[object], bool], lines: int = 50) -> Callable[[Path], bool]:
    """`own` test: JSON Lines whose first `lines` non-blank rows (at least one) all pass `row`."""

    def test(path: Path) -> bool:
        seen = 0
        try:
            with path.open(encoding="utf-8") as f:
                while raw := f.readline(_MAX_LINE):
                    if len(raw) >= _MAX_LINE:
                        return False
                    if not raw.strip():
                        continue
                    if not row(json.loads(raw)):
                        return False
                    seen += 1
                    if seen >= lines:
                        break
        except (OSError, ValueError):
            return False
        return seen > 0

    return test
