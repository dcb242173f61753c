"""End to end in a real browser: `streamlit run` the dashboard, visit every page with Chromium
(Playwright), move one control per page, and check that no exception is shown.

A screenshot of each page, after its control was moved, lands in test-artifacts/screenshots/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from dashboard.navigation import existing_pages
from tests.browser_support import (
    MAIN,
    PAGE_TIMEOUT_MS,
    SCREENSHOTS,
    StreamlitServer,
    assert_no_exception,
    main_html,
    screenshot,
    wait_for_rerun,
    wait_until_idle,
)

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
    "inside": lambda page: _slider_right(page, "Layer", steps=1),  # another layer's attention
    "prompting": lambda page: _slider_right(page, "Examples in the prompt (k)", steps=2),
}


# -- the server ---------------------------------------------------------------------------------


def app_pages() -> list[str]:
    """Page modules in the app's order that exist on disk."""
    return [module for module, _, _ in existing_pages()]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    app = StreamlitServer(tmp_path_factory.mktemp("streamlit"))
    try:
        yield app.start()
    finally:
        app.stop()


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
        assert_no_exception(page)
        assert page.locator(MAIN).inner_text().strip(), "the page is empty"

        action = ACTIONS.get(name)
        if action is not None:
            before = main_html(page)
            action(page)
            wait_for_rerun(page, before)
            assert_no_exception(page)
        screenshot(page, SCREENSHOTS / f"{name}.png")
    except BaseException:
        page.screenshot(path=str(SCREENSHOTS / f"{name}-failed.png"), full_page=True)
        raise
    finally:
        context.close()
