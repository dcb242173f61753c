"""genai-lab dashboard: `make run` (or `streamlit run dashboard/app.py`). One module per page."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the repo root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAGES = Path(__file__).parent / "pages"

# (module, title, icon) in the learning path's order.
PAGE_ORDER = [
    ("home", "Home", "🏠"),
    ("taxonomy", "AI, ML, DL, GenAI", "🪆"),
    ("tokens", "Tokens", "🔤"),
    ("next_token", "Next token & sampling", "🎲"),
    ("embeddings", "Embeddings", "🧭"),
    ("training_stages", "Training stages", "🏗️"),
    ("quantization", "Quantization", "🗜️"),
    ("lora", "LoRA & QLoRA", "🧩"),
    ("chat", "Chat", "💬"),
]


def available_pages() -> list:
    pages = []
    for module, title, icon in PAGE_ORDER:
        path = PAGES / f"{module}.py"
        if path.is_file():
            pages.append(st.Page(path, title=title, icon=icon, default=module == "home"))
    return pages


st.set_page_config(page_title="genai-lab", page_icon="🧪", layout="wide")
st.navigation(available_pages()).run()
