"""genai-lab dashboard: `make run` (or `streamlit run dashboard/app.py`). One module per page."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the repo root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Resolve transformers' lazy imports here, before any page starts a thread: they are not thread-safe.
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402, F401

from dashboard.navigation import existing_pages, page_path  # noqa: E402


def available_pages() -> list:
    return [
        st.Page(page_path(module), title=title, icon=icon, default=module == "home")
        for module, title, icon in existing_pages()
    ]


st.set_page_config(page_title="genai-lab", page_icon="🧪", layout="wide")
st.navigation(available_pages()).run()
