"""Background jobs: a command (`genai-lab finetune ...`) run in a detached process that outlives the
page that started it, the Streamlit session and the Streamlit server.

A job is a folder under the jobs root ($GENAI_LAB_JOBS, else jobs/ in the user's data folder):

    command.json   the argv as a user would type it (`genai-lab finetune ...`), its cwd
    state.json     queued | running | done | failed | cancelled, pids, times, exit code
    log.txt        the command's stdout and stderr
    output/        the command's own output folder (metrics.jsonl, adapter/, report.json)

`start(argv)` launches a runner (`python dashboard/lib/jobs.py FOLDER`) in its own session: it waits
for its turn (one job runs at a time, first come first served, through a flock on the root's
runner.lock, released by the kernel however the runner ends), runs the command in its process
group, and records how it ended. `Job.load(folder)` re-attaches from the files alone; a job whose
runner is gone while the state says queued/running is marked failed (interrupted).

No Streamlit here: the page and the tests use the same code.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from core.atomic import write_text_atomic
from core.userdata import user_data_path

JOBS_ENV = "GENAI_LAB_JOBS"  # overrides the jobs root (tests, several installs side by side)
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
OUTPUT = "output"
POLL_S = 0.2  # how often a queued runner checks whether it is first in line
CANCEL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
# tqdm's "12/120 [" (the finetune command's progress bar), the freshest step count in the log.
_TQDM = re.compile(r"(\d+)/(\d+) \[")


class JobError(ValueError):
    """A job folder that is missing or unreadable, or an action its state does not allow."""


def jobs_root() -> Path:
    """$GENAI_LAB_JOBS, else jobs/ in the user's data folder (core.userdata)."""
    return user_data_path("jobs", JOBS_ENV)


def valid_id(job_id: str) -> bool:
    """A job id as `start` makes them (also what keeps a URL's ?job=../.. out of the root)."""
    return bool(_ID.fullmatch(job_id or ""))


# -- processes ------------------------------------------------------------------------------------


def _proc_start(pid: int) -> int | None:
    """The kernel's start time of a pid (Linux), to tell a reused pid from ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int | None, started: int | None = None) -> bool:
    """Whether `pid` runs (a zombie does not count; nor does a reused pid whose start time
    differs from `started`)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def executable(argv: list[str]) -> list[str]:
    """What to execute for a typed argv: `genai-lab` and `python` mean this environment's (the
    page's PATH may not have the virtualenv on it)."""
    head, rest = argv[0], list(argv[1:])
    if head == "genai-lab":
        script = Path(sys.executable).parent / "genai-lab"
        return [str(script), *rest] if script.is_file() else [sys.executable, "-m", "core", *rest]
    if head in ("python", "python3"):
        return [sys.executable, *rest]
    return list(argv)


# -- one job ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    step: int
    total: int | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


class Job:
    """A job folder; every property reads the files, so any process can follow any job."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def id(self) -> str:
        return self.folder.name

    @classmethod
    def load(cls, folder: str | Path) -> Job:
        """Re-attach to a job: check it is one, and mark it failed (interrupted) if its runner
        died without saying how the command ended (a reboot, a SIGKILL)."""
        job = cls(Path(folder))
        if not (job.folder / "command.json").is_file():
            raise JobError(f"{job.folder}: not a job folder (no command.json)")
        job.reconcile()
        return job

    # files
    @property
    def command(self) -> dict:
        return json.loads((self.folder / "command.json").read_text(encoding="utf-8"))

    @property
    def argv(self) -> list[str]:
        return self.command["argv"]

    @property
    def display(self) -> str:
        """The command as one line a user can paste into a shell."""
        return shlex.join(self.argv)

    @property
    def output_dir(self) -> Path:
        return self.folder / OUTPUT

    @property
    def log_path(self) -> Path:
        return self.folder / "log.txt"

    def state(self) -> dict:
        try:
            return json.loads((self.folder / "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise JobError(f"{self.folder}: cannot read state.json ({e})") from None

    @property
    def status(self) -> str:
        return self.state()["status"]

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write of state.json between the runner and cancel()."""
        with open(self.folder / ".state.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def update(self, **changes) -> dict:
        """Merge `changes` into state.json (atomically: readers never see half a file). A final
        state is never overwritten by a later active one."""
        with self._locked():
            state = self.state()
            if state["status"] in FINAL and changes.get("status") in ACTIVE:
                return state
            state.update(changes)
            write_text_atomic(self.folder / "state.json", json.dumps(state, indent=2) + "\n")
            return state

    def reconcile(self) -> dict:
        state = self.state()
        if state["status"] not in ACTIVE:
            return state
        pid = state.get("pid")
        young = time.time() - state.get("created", 0) < 30  # the runner may not have said its pid
        if pid_alive(pid, state.get("pid_start")) or (pid is None and young):
            return state
        if state.get("cancel_requested"):  # killed by cancel() before it could say so
            return self.update(status="cancelled", ended=time.time())
        return self.update(
            status="failed",
            interrupted=True,
            ended=time.time(),
            error=f"interrupted: its runner (pid {pid}) is gone",
        )

    # what the page shows
    def queue_position(self) -> int | None:
        """1 = next to run; None unless queued."""
        if self.status != "queued":
            return None
        ahead = [j for j in list_jobs(self.folder.parent) if j.status == "queued"]
        ids = [j.id for j in sorted(ahead, key=lambda j: (j.state().get("created", 0), j.id))]
        return ids.index(self.id) + 1 if self.id in ids else None

    def metrics(self) -> list[dict]:
        """output/metrics.jsonl, skipping a line still being written."""
        path = self.output_dir / "metrics.jsonl"
        records = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of log.txt, progress-bar redraws (\\r) reduced to their last state."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - 4 * max_chars))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        lines = []
        for line in text.split("\n"):
            redraws = [part for part in line.split("\r") if part.strip()]
            lines.append(redraws[-1] if redraws else "")
        return "\n".join(lines)[-max_chars:]

    def progress(self) -> Progress:
        """Step and total: from the progress bar in the log (fresh every step), else from the
        metrics and the command's --max-steps."""
        found = _TQDM.findall(self.log_tail(8000))
        if found:
            step, total = found[-1]
            return Progress(int(step), int(total))
        steps = [int(r["step"]) for r in self.metrics() if "step" in r]
        argv = self.argv
        total = None
        if "--max-steps" in argv[:-1]:
            try:
                total = int(argv[argv.index("--max-steps") + 1])
            except ValueError:
                total = None
        return Progress(max(steps, default=0), total)

    # actions
    def cancel(self, grace_s: float = CANCEL_GRACE_S) -> dict:
        """SIGTERM the job's process group, SIGKILL it after `grace_s`, record cancelled. The
        finetune command keeps its complete checkpoints: `resume()` continues from them."""
        state = self.update(cancel_requested=True)
        if state["status"] in FINAL:
            return state
        pgid = state.get("pid")
        if pgid and pid_alive(pgid, state.get("pid_start")):
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while group_alive(pgid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        # The runner records cancelled itself when it outlives its command; after a SIGKILL (or
        # before it ever started) this does.
        with self._locked():
            state = self.state()
            if state["status"] not in FINAL:
                state.update(status="cancelled", ended=time.time())
                write_text_atomic(self.folder / "state.json", json.dumps(state, indent=2) + "\n")
        return state

    def resume(self, flag: str = "--resume") -> Job:
        """Run a cancelled or failed job again in the same folder with `flag` added (the
        finetune command continues from its newest complete checkpoint)."""
        state = self.reconcile()
        if state["status"] not in ("cancelled", "failed"):
            raise JobError(f"job {self.id} is {state['status']}: only a stopped job resumes")
        command = self.command
        if flag not in command["argv"]:
            command["argv"] = [*command["argv"], flag]
        write_text_atomic(self.folder / "command.json", json.dumps(command, indent=2) + "\n")
        with self._locked():
            fresh = {"status": "queued", "created": time.time(), "pid": None, "resumed": True}
            write_text_atomic(self.folder / "state.json", json.dumps(fresh, indent=2) + "\n")
        _spawn_runner(self)
        return self


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


# -- starting and listing ------------------------------------------------------------------------


def _new_folder(root: Path) -> Path:
    """A fresh folder with a unique id: mkdir without exist_ok is the arbiter between two
    sessions starting at once."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        folder = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def start(
    argv: list[str],
    root: Path | None = None,
    output_flag: str | None = None,
    cwd: str | Path | None = None,
) -> Job:
    """Queue `argv` as a new job and return at once. With `output_flag` (e.g. "--output-dir"),
    `output_flag <job>/output` is appended, so the command writes into the job's folder."""
    if not argv:
        raise JobError("empty command")
    folder = _new_folder(root or jobs_root())
    argv = list(argv)
    if output_flag:
        argv += [output_flag, str(folder / OUTPUT)]
    command = {"argv": argv, "cwd": str(Path(cwd or os.getcwd()).resolve())}
    write_text_atomic(folder / "command.json", json.dumps(command, indent=2) + "\n")
    state = {"status": "queued", "created": time.time(), "pid": None}
    write_text_atomic(folder / "state.json", json.dumps(state, indent=2) + "\n")
    job = Job(folder)
    _spawn_runner(job)
    return job


_runners: list[subprocess.Popen] = []  # reaped by _reap(), so no zombie outlives its job


def _reap() -> None:
    _runners[:] = [p for p in _runners if p.poll() is None]


def _spawn_runner(job: Job) -> None:
    """Start the runner (`python dashboard/lib/jobs.py FOLDER`) in a new session, so it leads
    its own process group (cancel() signals exactly the job) and a Ctrl-C or restart of the
    server spares it; record its pid before returning."""
    _reap()
    runner = subprocess.Popen(
        # -P: the script's folder (dashboard/lib) is not put on sys.path to shadow anything
        [sys.executable, "-P", str(Path(__file__).resolve()), str(job.folder)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _runners.append(runner)
    job.update(pid=runner.pid, pid_start=_proc_start(runner.pid))


def list_jobs(root: Path | None = None) -> list[Job]:
    """Every job under the root, newest first (folders that are not jobs are skipped)."""
    _reap()
    root = root or jobs_root()
    if not root.is_dir():
        return []
    jobs = []
    for folder in sorted(root.iterdir(), reverse=True):
        if valid_id(folder.name) and (folder / "state.json").is_file():
            try:
                jobs.append(Job.load(folder))
            except JobError:
                continue
    return jobs


# -- the runner ---------------------------------------------------------------------------------


def _first_in_line(job: Job) -> bool:
    queued = []
    for other in list_jobs(job.folder.parent):
        try:
            state = other.state()
        except JobError:
            continue
        if state["status"] == "queued":
            queued.append((state.get("created", 0), other.id))
    return not queued or min(queued)[1] == job.id


def _run(job: Job) -> int:
    """The runner's body (in its own session): wait for the slot, run, record the outcome."""
    stop = {"requested": False}

    def on_term(signum, frame):  # cancel(): let the command die, then say so
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_term)
    lock = open(job.folder.parent / "runner.lock", "a")  # noqa: SIM115 (held until exit)
    while True:
        if stop["requested"] or job.state().get("cancel_requested"):
            job.update(status="cancelled", ended=time.time())
            return 0
        if _first_in_line(job):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
        time.sleep(POLL_S)
    command = job.command
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log fills as the command prints
    with job.log_path.open("ab") as log:
        try:
            child = subprocess.Popen(
                executable(command["argv"]),
                cwd=command.get("cwd"),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        except OSError as e:
            log.write(f"cannot start {command['argv'][0]}: {e}\n".encode())
            _sync(log)  # the line is on disk before the state says why to read it
            # As a shell says it: 127 command not found, 126 found but not executable.
            code = 127 if isinstance(e, FileNotFoundError) else 126
            job.update(status="failed", ended=time.time(), exit_code=code, error=str(e))
            return 0
        job.update(status="running", started=time.time(), child_pid=child.pid)
        code = child.wait()
        _sync(log)  # all the command wrote, before the state says it ended
    cancelled = stop["requested"] or job.state().get("cancel_requested")
    status = "cancelled" if cancelled else ("done" if code == 0 else "failed")
    job.update(status=status, ended=time.time(), exit_code=code)
    return 0


def _sync(log) -> None:
    """Flush and fsync the log: a reader that sees a final state (written after this, and
    fsynced by write_text_atomic) always finds the log complete."""
    log.flush()
    os.fsync(log.fileno())


def _main(folder: str) -> None:
    job = Job(Path(folder))
    try:
        code = _run(job)
    except BaseException as e:  # record why, whatever it was: a job never stays "running"
        job.update(status="failed", ended=time.time(), error=f"runner: {e!r}")
        raise
    sys.exit(code)


if __name__ == "__main__":
    _main(sys.argv[1])
