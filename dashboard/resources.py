"""Models loaded once per server process and shared by every page and session."""

from __future__ import annotations

import threading

import numpy as np
import streamlit as st

from chat import embeddings
from core import load_model
from core.lm.loader import resolve_model_path
from core.lm.tokenizer import load_tokenizer


@st.cache_resource(show_spinner="Loading the model ...")
def tutor(name: str = "tutor"):
    """(model, tokenizer) of a shipped model, in eval mode."""
    folder = resolve_model_path(name)
    return load_model(folder), load_tokenizer(folder)


@st.cache_resource(show_spinner=False)
def tutor_tokenizer(name: str = "tutor-base"):
    """Only the tokenizer of a shipped model (the tokens page needs no weights)."""
    return load_tokenizer(resolve_model_path(name))


@st.cache_resource(show_spinner=False)
def wordpiece_tokenizer():
    """MiniLM's WordPiece tokenizer (BERT's uncased vocabulary of 30,522 pieces)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embeddings.minilm_path()), local_files_only=True)


@st.cache_resource(show_spinner="Loading all-MiniLM-L6-v2 ...")
def minilm():
    """The sentence-transformers MiniLM model (the same object chat.embeddings.embed uses)."""
    return embeddings.load_minilm()


@st.cache_data(show_spinner=False, max_entries=64)
def sentence_vectors(texts: tuple[str, ...]) -> np.ndarray:
    """MiniLM embeddings [n, 384] of `texts`, cached by the exact tuple of texts."""
    minilm()
    return embeddings.embed(list(texts))


@st.cache_resource(show_spinner=False)
def warm_up_in_background() -> threading.Thread:
    """Load MiniLM and compile UMAP (numba, ~10 s) in a daemon thread, once per process, so the
    embeddings page is fast when the visitor gets there. Callers never wait for it."""

    def work() -> None:
        embeddings.load_minilm()
        embeddings.warm_up_umap()

    thread = threading.Thread(target=work, name="genai-lab-warm-up", daemon=True)
    thread.start()
    return thread
