"""End to end in a real browser: `streamlit run` the dashboard, visit every page with Chromium
(Playwright), move one control per page, and check that no exception is shown.

A screenshot of each page, after its control was moved, lands in test-artifacts/screenshots/.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dashboard.navigation import existing_pages

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "dashboard" / "app.py"
PAGES = ROOT / "dashboard" / "views"
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

pytestmark = pytest.mark.slow


# -- one action per page: move a control the way a visitor would ------------------------------
# Keyed by page module name (dashboard/views/<name>.py). Pages without an entry are only checked
# to load without an exception. Each action gets the Playwright page of a loaded app page.


def _slider_right(page, label: str, steps: int = 3) -> None:
    slider = page.locator('[data-testid="stSlider"]').filter(has_text=label).get_by_role("slider")
    slider.focus()
    for _ in range(steps):
        page.keyboard.press("ArrowRight")


def _type_into(page, label: str, text: str, submit: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(text)
    box.press(submit)


def _choose_radio(page, option: str) -> None:
    page.locator('[data-testid="stRadio"]').get_by_text(option, exact=True).first.click()


ACTIONS: dict[str, Callable] = {
    "home": lambda page: _type_into(page, "Start of a text", "Once upon a time", "Enter"),
    "taxonomy": lambda page: _slider_right(page, "New points to generate"),
    "tokens": lambda page: _type_into(
        page, "Text to tokenize", "Hello, tokens! 東京 🙂", "Control+Enter"
    ),
    "embeddings": lambda page: _choose_radio(page, "t-SNE"),
    "next_token": lambda page: _slider_right(page, "Temperature"),
    "quantization": lambda page: _choose_radio(page, "FP4 (4-bit float)"),
    "lora": lambda page: _slider_right(page, "Rank r"),
}


# -- the server ---------------------------------------------------------------------------------


def app_pages() -> list[str]:
    """Page modules in the app's order that exist on disk."""
    return [module for module, _, _ in existing_pages()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # The chat and feedback pages write databases: keep them out of the user's data folder.
        "GENAI_LAB_CHAT_DB": str(log_path.parent / "chat.sqlite"),
        "GENAI_LAB_FEEDBACK_DB": str(log_path.parent / "feedback.db"),
    }
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.port", str(port), "--server.headless", "true",
        "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_health(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_health(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"streamlit exited early:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no /_stcore/health after {SERVER_START_S} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing (the Makefile's test target installs Debian chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


# -- waiting for Streamlit ----------------------------------------------------------------------

_STATE = "document.querySelector('[data-testid=\"stApp\"]')?.dataset.testScriptState"


def wait_until_idle(page) -> None:
    """Wait until the page's script run has finished (stApp's data-test-script-state)."""
    page.wait_for_function(f"() => {_STATE} === 'notRunning'", timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(300)  # let the frontend paint the last deltas (charts)


def wait_for_rerun(page, before: str) -> None:
    """After a control moved: wait for the rerun it triggers to finish and change the page."""
    deadline = time.monotonic() + PAGE_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        wait_until_idle(page)
        if main_html(page) != before:
            return
        page.wait_for_timeout(250)
    raise AssertionError("moving the control did not change the page")


MAIN = '[data-testid="stMainBlockContainer"]'  # the page's body, with or without a chat input


def main_html(page) -> str:
    return page.locator(MAIN).inner_html()


# -- the tests ----------------------------------------------------------------------------------


def test_a_deep_link_on_a_fresh_server_gets_the_apps_navigation(server, browser):
    """Must run first in this module: it checks the first visit a fresh server gets."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        name = next(n for n in app_pages() if n != "home")
        page.goto(f"{server}/{name}")
        page.wait_for_selector(MAIN)
        wait_until_idle(page)
        navigation = page.locator('[data-testid="stSidebarNav"]').inner_text()
        assert "Home" in navigation and "app" not in navigation.split(), navigation
    finally:
        page.close()


@pytest.mark.parametrize("name", app_pages())
def test_page_in_browser(server, browser, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        path = "" if name == "home" else name  # the default page lives at the root URL
        page.goto(f"{server}/{path}", timeout=PAGE_TIMEOUT_MS)
        page.wait_for_selector(MAIN)
        wait_until_idle(page)
        assert page.locator('[data-testid="stException"]').count() == 0, _exception_text(page)
        assert page.locator(MAIN).inner_text().strip(), "the page is empty"

        action = ACTIONS.get(name)
        if action is not None:
            before = main_html(page)
            action(page)
            wait_for_rerun(page, before)
            assert page.locator('[data-testid="stException"]').count() == 0, _exception_text(page)
        _screenshot(page, SCREENSHOTS / f"{name}.png")
    except BaseException:
        page.screenshot(path=str(SCREENSHOTS / f"{name}-failed.png"), full_page=True)
        raise
    finally:
        context.close()


def _exception_text(page) -> str:
    return "\n".join(t[:800] for t in page.locator('[data-testid="stException"]').all_inner_texts())


def _screenshot(page, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main container, so grow the viewport to the
    content's height first."""
    height = page.evaluate(
        """() => Math.max(...["stMain", "stAppScrollToBottomContainer", "stSidebarContent"]
            .map(id => document.querySelector(`[data-testid="${id}"]`)?.scrollHeight || 0))"""
    )
    page.set_viewport_size({"width": 1400, "height": min(max(height, 1000), 12_000)})
    wait_until_idle(page)
    page.screenshot(path=str(path), full_page=True)
