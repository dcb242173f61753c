"""Models loaded once per server process and shared by every page and session."""

from __future__ import annotations

import streamlit as st

from core import load_model
from core.hf import resolve_model_path
from core.tokenizer import load_tokenizer


@st.cache_resource(show_spinner="Loading the model ...")
def tutor(name: str = "tutor"):
    """(model, tokenizer) of a shipped model, in eval mode."""
    folder = resolve_model_path(name)
    return load_model(folder), load_tokenizer(folder)
