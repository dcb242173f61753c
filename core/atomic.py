"""Writes that a kill cannot tear: a folder or a file is written under a temporary name beside
its target, flushed to disk, and renamed into place, so readers see the old version or the new
one, never half. Deletions rename first too, so a kill mid-delete never leaves a gutted folder
under its real name; `clean_stale_temps` clears (or finishes) what a killed writer left behind.

Temp names carry the writer's pid (`.NAME.tmp-PID-XXXX`, `.NAME.old-PID-XXXX`,
`.deleting-NAME-PID-XXXX`) so a later process can tell a dead writer's leftovers from a live
writer's work in progress.

Nothing of a user's is lost here: a hidden `.NAME.old-*` only ever holds the writer's own previous
version (deleted once the new one is in place). A folder swap never replaces a file, and content
that is not the writer's own (see `atomic_directory`'s `own`) goes aside under a visible name,
`NAME.old-TIMESTAMP`, that is printed. Which user-named outputs a command may write over at all
is decided before any work by core.outputs.

Torch-free and free of other core imports: the tests load this file on its own.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# A temp name without a pid comes from code before pids were embedded; its writer cannot be
# checked, so it counts as stale only once untouched this long (no write of ours takes that long
# without touching its folder).
LEGACY_STALE_SECONDS = 10 * 60

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$")
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$")  # tempfile's 8 random chars
_DELETING = re.compile(r"^\.deleting-.+-(?P<pid>\d+)-[0-9a-f]{8}$")


class OutputError(ValueError):
    """An output path that cannot be written without losing something (a file where a folder
    goes, a folder where a file goes, someone else's content): the message says what to pass
    instead. A ValueError, so the CLI prints it as its one `error:` line."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def aside_path(path: str | Path) -> Path:
    """A free visible sibling name for old content: `NAME.old-YYYYMMDD-HHMMSS` (then -2, -3...)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.old-{stamp}")
    n = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    return candidate


def move_aside(path: str | Path, say: Callable[[str], None] = _say) -> Path:
    """Rename `path` (a file or a folder) to `aside_path(path)`, durably, and say where it went.
    Nothing is deleted."""
    path = Path(path)
    target = aside_path(path)
    os.rename(path, target)  # the target name is free: a folder is never renamed over another
    fsync_dir(path.parent)
    say(f"moved the old {path} aside to {target} (nothing was deleted)")
    return target


def check_parent(path: str | Path) -> None:
    """OutputError when an existing ancestor of `path` is a file: no folder can be made there
    (instead of a mkdir error naming that ancestor alone)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{parent} is a file, so {path} cannot be written there")
            return
        if parent.is_symlink():  # a link to nothing
            raise OutputError(f"{parent} is a broken link, so {path} cannot be written there")


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def _suffix() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename is only durable once its folder is); a no-op where
    folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path` (deepest first), so a rename of `path` never
    publishes names whose data is still only in the page cache."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def atomic_directory(path: Path, own: Callable[[Path], bool] | None = None):
    """Context manager: write into a temp folder beside `path`, then swap it into place so a
    crash never leaves a half-written folder under the final name.

    An existing folder at `path` is replaced. It is deleted only when it is the writer's own
    previous version: always for internal folders (`own` None: checkpoints, a run's final/), else
    when `own(path)` says so; anything else is moved aside to a visible `NAME.old-TIMESTAMP`,
    which is printed. A file at `path` is refused (OutputError) before any work."""
    return _AtomicDir(Path(path), own)


class _AtomicDir:
    def __init__(self, path: Path, own: Callable[[Path], bool] | None = None) -> None:
        self.path = path
        self.own = own

    def _refuse_non_folder(self) -> None:
        if (self.path.exists() or self.path.is_symlink()) and not self.path.is_dir():
            raise OutputError(
                f"{self.path} is a file, not a folder: nothing was written; pass a folder path"
            )

    def __enter__(self) -> Path:
        self._refuse_non_folder()
        check_parent(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-", dir=self.path.parent)
        )
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a model folder is not
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        fsync_tree(self.tmp)  # the contents are on disk before any name points at them
        old = None
        if self.path.exists() or self.path.is_symlink():
            mine = (
                self.path.is_dir()
                and not self.path.is_symlink()
                and (self.own is None or not any(self.path.iterdir()) or self.own(self.path))
            )
            if mine:
                # A folder cannot replace a non-empty folder in one rename: move the old one
                # aside. A kill between the two renames is repaired by clean_stale_temps (same
                # pid pairs).
                old = self.path.with_name(f".{self.path.name}.old-{_suffix()}")
                os.replace(self.path, old)
            else:
                # Not ours to delete (appeared while we worked, or a link): kept, visibly.
                move_aside(self.path)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            if old.exists():  # e.g. a file inside it we may not delete
                _say(
                    f"warning: could not delete the previous version of {self.path}: it is at {old}"
                )


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that takes a file name (safetensors,
    torch); on success it is fsynced and renamed over `path`, on error removed."""
    path = Path(path)
    if path.is_dir():  # (os.replace would fail naming the temp file)
        raise OutputError(f"{path} is a folder, not a file: give a file name to write")
    check_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a report or cache is not
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as e:  # name the target, not our temp file
            raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a whole text file by temp + fsync + rename (+ fsync of the folder)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def delete_directory(path: Path) -> None:
    """Delete a folder so that no kill leaves it half-deleted under its real name: rename it to
    `.deleting-NAME-...` first (one atomic step), then remove that."""
    path = Path(path)
    trash = path.with_name(f".deleting-{path.name}-{_suffix()}")
    os.replace(path, trash)
    fsync_dir(path.parent)  # the rename is durable before any file inside is unlinked
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True  # cannot tell (e.g. Windows): keep it
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temps(folder: str | Path, name: str | None = None) -> list[str]:
    """Clear what killed writers left in `folder` (not recursive); returns what was done.
    With `name`, only what was left while writing `folder/name` (for a folder that is the
    user's own, such as the one a merge writes its output into).

    Rule for "killed": a temp name's embedded pid is not a running process on this machine
    (a live writer's temp is never touched; a run folder is assumed not to be written from two
    machines at once). Temp names without a pid (older code) count once untouched for
    LEGACY_STALE_SECONDS. A dead deleter's `.deleting-*` folder is finished off.
    A folder swap killed between its two renames (target missing, `.old-PID` and `.tmp-PID`
    present) is finished: the temp is complete by then, so it takes the target's name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done: list[str] = []
    entries = sorted(folder.iterdir())
    temps: dict[tuple[str, int], dict[str, list[Path]]] = {}
    for entry in entries:
        if name is not None and not entry.name.startswith((f".{name}.", f".deleting-{name}-")):
            continue
        if m := _DELETING.match(entry.name):
            if not _pid_alive(int(m["pid"])):  # a live one is being deleted by its owner
                _remove(entry)
                done.append(f"removed {entry.name}")
        elif m := _TEMP.match(entry.name):
            pid = int(m["pid"])
            if not _pid_alive(pid):
                temps.setdefault((m["name"], pid), {"tmp": [], "old": []})[m["kind"]].append(entry)
        elif m := _LEGACY_TMP.match(entry.name):
            try:
                age = time.time() - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > LEGACY_STALE_SECONDS:
                _remove(entry)
                done.append(f"removed {entry.name}")
    for (name, _pid), kinds in temps.items():
        target = folder / name
        tmps, olds = kinds["tmp"], kinds["old"]
        if olds and not target.exists():
            # Killed between "old aside" and "new in place": the one temp (if unambiguous) is
            # the complete new version; otherwise put the old version back.
            source = tmps[0] if len(tmps) == 1 and tmps[0].is_dir() else olds[0]
            os.replace(source, target)
            fsync_dir(folder)
            done.append(f"restored {name} from {source.name}")
        for leftover in [*tmps, *olds]:
            if leftover.exists() or leftover.is_symlink():
                _remove(leftover)
                done.append(f"removed {leftover.name}")
    return done
