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

st.set_page_config(page_title="genai-lab", page_icon="🧪", layout="wide")

pages = [
    st.Page(PAGES / "home.py", title="Home", icon="🏠", default=True),
]
st.navigation(pages).run()
