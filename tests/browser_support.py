"""What the browser tests share: a `streamlit run` of the dashboard on a free localhost port (that
can be stopped and started again on the same port and data, as a server restart), Debian's
Chromium through Playwright, and waiting for Streamlit's reruns.

The `browser` fixture (tests/conftest.py) launches the browser; `StreamlitServer` runs the app.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "dashboard" / "app.py"
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
SERVER_START_S = 120  # imports and the first model loads on a busy 2-core machine
PAGE_TIMEOUT_MS = 120_000  # a page's first run loads its models
MAIN = '[data-testid="stMainBlockContainer"]'  # the page's body, with or without a chat input
_STATE = "document.querySelector('[data-testid=\"stApp\"]')?.dataset.testScriptState"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StreamlitServer:
    """`streamlit run dashboard/app.py` with its databases and jobs in `folder` (never the user's
    data folder). `start()` / `stop()` may be called again: the port and the data stay."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "server.log"
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "GENAI_LAB_CHAT_DB": str(folder / "chat.sqlite"),
            "GENAI_LAB_FEEDBACK_DB": str(folder / "feedback.db"),
            "GENAI_LAB_JOBS": str(folder / "jobs"),
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        command = [
            sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.port", str(self.port), "--server.headless", "true",
            "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_for_health()
        return self.url

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def _wait_for_health(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"streamlit exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"no /_stcore/health after {SERVER_START_S} s:\n{self.log_tail()}")


def wait_until_idle(page) -> None:
    """Wait until the page's script run has finished (stApp's data-test-script-state)."""
    page.wait_for_function(f"() => {_STATE} === 'notRunning'", timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(300)  # let the frontend paint the last deltas (charts)


def main_html(page) -> str:
    return page.locator(MAIN).inner_html()


def wait_for_rerun(page, before: str) -> None:
    """After a control moved: wait for the rerun it triggers to finish and change the page."""
    deadline = time.monotonic() + PAGE_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        wait_until_idle(page)
        if main_html(page) != before:
            return
        page.wait_for_timeout(250)
    raise AssertionError("moving the control did not change the page")


def exception_text(page) -> str:
    return "\n".join(t[:800] for t in page.locator('[data-testid="stException"]').all_inner_texts())


def assert_no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, exception_text(page)


def screenshot(page, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main container, so grow the viewport to the
    content's height first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height = page.evaluate(
        """() => Math.max(...["stMain", "stAppScrollToBottomContainer", "stSidebarContent"]
            .map(id => document.querySelector(`[data-testid="${id}"]`)?.scrollHeight || 0))"""
    )
    page.set_viewport_size({"width": 1400, "height": min(max(height, 1000), 12_000)})
    wait_until_idle(page)
    page.screenshot(path=str(path), full_page=True)
