"""Dashboard pages render without exceptions and react to their controls (Streamlit AppTest)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGES = Path(__file__).resolve().parent.parent / "dashboard" / "pages"


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=60)
    return at.run()


def test_app_entry_point_renders_home():
    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "genai-lab"


def test_home_generates_and_reacts_to_the_prompt():
    at = page("home")
    assert not at.exception
    first = at.markdown[-1].value
    assert first.startswith("**The cat sat on the**")
    assert len(first) > len("**The cat sat on the**") + 5  # the model added text
    at.text_input[0].set_value("Once upon a time").run()
    assert not at.exception
    assert at.markdown[-1].value.startswith("**Once upon a time**")


@pytest.mark.parametrize("text", ["", "The cat " * 200])
def test_home_handles_empty_and_too_long_text(text):
    at = page("home")
    at.text_input[0].set_value(text).run()
    assert not at.exception
    messages = [m.value for m in (*at.info, *at.warning)]
    assert messages, "the page must say what is wrong"
