"""The job runner (dashboard/lib/jobs.py) with real detached processes: run, re-attach, cancel
(the whole process group), queue, failure, resume, and two sessions starting at once."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from dashboard.lib import jobs
from dashboard.lib.jobs import Job, JobError, pid_alive

PY = "python"  # as typed; the runner executes this environment's interpreter


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "jobs"
    monkeypatch.setenv(jobs.JOBS_ENV, str(folder))  # never the user's data folder
    yield folder
    for job in jobs.list_jobs(folder):  # no test leaves a process behind
        if job.active:
            job.cancel(grace_s=0.5)


def wait(job: Job, timeout: float = 10.0, until=lambda job: not job.active) -> Job:
    deadline = time.monotonic() + timeout
    while not until(job):
        assert time.monotonic() < deadline, f"job {job.id}: still {job.status}"
        time.sleep(0.05)
    return job


def lines_printing(n: int, pause: float, then: str = "") -> list[str]:
    code = (
        "import time\n"
        f"for i in range({n}):\n"
        f"    print(f'step {{i + 1}}/{n} [', flush=True)\n"
        f"    time.sleep({pause})\n" + then
    )
    return [PY, "-c", code]


def test_a_job_runs_detached_logs_and_reattaches_from_its_folder(root):
    job = jobs.start(lines_printing(4, 0.2))
    command = json.loads((job.folder / "command.json").read_text())
    assert command["argv"][0] == "python" and job.display.startswith("python -c ")
    assert job.state()["pid"] and os.getpgid(job.state()["pid"]) == job.state()["pid"]
    # another process (a reloaded page) knows the job by its folder alone
    again = Job.load(root / job.id)
    assert again.status in ("queued", "running")
    seen = set()
    while again.active:  # state.json is only ever replaced whole: always valid JSON
        seen.add(json.loads((job.folder / "state.json").read_text())["status"])
    assert seen <= {"queued", "running", "done"}
    state = again.state()
    assert state["status"] == "done" and state["exit_code"] == 0
    assert state["ended"] >= state["started"] >= state["created"]
    assert "step 4/4 [" in again.log_tail()
    assert again.progress() == jobs.Progress(4, 4)
    assert [j.id for j in jobs.list_jobs()] == [job.id]


def test_a_failing_command_is_failed_with_its_exit_code(root):
    job = wait(jobs.start([PY, "-c", "import sys; print('bad input'); sys.exit(3)"]))
    assert job.status == "failed" and job.state()["exit_code"] == 3
    assert "bad input" in job.log_tail()
    missing = wait(jobs.start(["no-such-command-here"]))
    assert missing.status == "failed" and "cannot start" in missing.log_tail()
    assert missing.state()["exit_code"] == 127  # as a shell says "command not found"


@pytest.mark.slow
def test_every_failed_job_has_its_log_line_when_its_state_says_failed(tmp_path):
    """200 failing jobs at once (a missing executable, a command that exits 3), in 40 queues so
    that many runners finish together: the moment a job's state says failed, its log already
    holds its line (the runner fsyncs the log before it writes the state)."""
    expected: dict[str, tuple[Job, str, int]] = {}
    try:
        for i in range(200):
            root = tmp_path / f"root-{i % 40}"
            if i % 2:
                argv = [PY, "-c", f"import sys; print('bad input {i}'); sys.exit(3)"]
                line, code = f"bad input {i}", 3
            else:
                argv, line, code = (
                    [f"no-such-command-{i}"],
                    f"cannot start no-such-command-{i}",
                    127,
                )
            job = jobs.start(argv, root=root)
            expected[str(job.folder)] = (job, line, code)
        pending = dict(expected)
        deadline = time.monotonic() + 600  # generous: 200 processes on a loaded 2-core machine
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} jobs still not ended"
            for key, (job, line, code) in list(pending.items()):
                state = job.state()
                if state["status"] in jobs.ACTIVE:
                    continue
                # Read right after the state: a log written after it would show up here empty.
                assert line in job.log_tail(), (job.id, state, job.log_tail())
                assert state["status"] == "failed" and state["exit_code"] == code, (job.id, state)
                del pending[key]
            time.sleep(0.05)
    finally:
        for job, _, _ in expected.values():  # no test leaves a process behind
            if job.active:
                job.cancel(grace_s=0.5)


def test_cancel_stops_the_whole_process_group_and_records_cancelled(root):
    # The command starts a grandchild and ignores SIGTERM: only SIGKILL of the group ends both.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('grandchild', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    job = wait(jobs.start([PY, "-c", code]), until=lambda j: "grandchild" in j.log_tail())
    runner = job.state()["pid"]
    child = job.state()["child_pid"]
    grandchild = int(job.log_tail().split()[-1])
    started = time.monotonic()
    state = job.cancel(grace_s=0.5)
    assert time.monotonic() - started < 5
    assert state["status"] == "cancelled" and Job.load(job.folder).status == "cancelled"
    for pid in (runner, child, grandchild):
        assert not pid_alive(pid)
    assert not jobs.group_alive(runner)


def test_cancel_of_a_polite_command_lets_the_runner_record_its_exit_code(root):
    job = wait(jobs.start(lines_printing(100, 0.1)), until=lambda j: "step 2/" in j.log_tail())
    state = job.cancel()
    assert state["status"] == "cancelled"
    assert wait(job, until=lambda j: "exit_code" in j.state()).state()["exit_code"] == -15
    with pytest.raises(JobError, match="only a stopped job"):
        jobs.start(lines_printing(1, 0)).resume()  # a queued or running job does not resume


def test_resume_reruns_the_same_folder_with_the_resume_flag(root):
    code = "import sys; print('args', sys.argv[1:])"
    job = wait(jobs.start([PY, "-c", code + "; sys.exit(0 if '--resume' in sys.argv else 1)"]))
    assert job.status == "failed"
    job.resume()
    assert job.argv[-1] == "--resume"
    assert wait(job).status == "done"
    assert job.log_tail().count("args") == 2  # the log keeps both runs


def test_one_job_runs_at_a_time_and_the_next_waits_its_turn(root):
    first = jobs.start(lines_printing(3, 0.3))
    second = jobs.start(lines_printing(1, 0))
    wait(first, until=lambda j: j.status == "running")
    assert second.status == "queued" and second.queue_position() == 1
    wait(second)
    assert first.status == "done" and second.status == "done"
    assert second.state()["started"] >= first.state()["ended"]


def test_a_queued_job_cancels_without_ever_running(root):
    first = jobs.start(lines_printing(3, 0.3))
    second = jobs.start(lines_printing(1, 0))
    assert second.cancel()["status"] == "cancelled"
    assert "started" not in second.state()
    wait(first)
    assert second.status == "cancelled" and not second.log_tail()


def test_a_job_whose_runner_died_is_marked_interrupted_on_reattach(root):
    job = wait(jobs.start(lines_printing(100, 0.1)), until=lambda j: j.status == "running")
    os.killpg(job.state()["pid"], signal.SIGKILL)  # a reboot: nobody records anything
    wait(job, until=lambda j: not pid_alive(j.state()["pid"]))
    state = Job.load(job.folder).state()
    assert state["status"] == "failed" and state["interrupted"]
    assert "interrupted" in state["error"]


def test_two_sessions_starting_at_once_get_separate_folders(root):
    started: list[Job] = []
    threads = [
        threading.Thread(target=lambda: started.append(jobs.start([PY, "-c", "pass"])))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({job.id for job in started}) == 4
    for job in started:
        assert wait(job).status == "done"


def test_loading_something_that_is_not_a_job_is_one_clear_error(tmp_path):
    with pytest.raises(JobError, match="not a job folder"):
        Job.load(tmp_path)
    assert not jobs.valid_id("../../etc") and jobs.valid_id("20250101-120000-abcdef")
    assert jobs.executable(["python", "-c", "pass"])[0] == sys.executable
