"""A test-only switch for kill tests: `GENAI_LAB_KILL_AT=NAME` (or `NAME@STEP`) makes the process
SIGKILL itself the first time it reaches `killpoint(NAME)` (or `killpoint(NAME, STEP)`), so a test
can cut a run at an exact moment and check that `--resume` repairs it. Unset (always, outside
tests) it does nothing.

The points (grep `killpoint(` for where):
    checkpoint-save@STEP    core.train.checkpoint: files written, the folder not yet renamed in
    after-checkpoint@STEP   finetune.run: a TRL checkpoint complete (COMPLETE written)
    adapter-save            finetune.run: adapter files written, the folder not yet renamed in
    after-adapter-save      finetune.run: the adapter in place, no report yet
    after-report            finetune.run: report.json/md written (the run's last write)
"""

from __future__ import annotations

import os
import signal

ENV = "GENAI_LAB_KILL_AT"


def killpoint(name: str, step: int | None = None) -> None:
    """SIGKILL this process if $GENAI_LAB_KILL_AT names this point (and step, if it gives one)."""
    wanted = os.environ.get(ENV)
    if wanted and wanted in (name, f"{name}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)
