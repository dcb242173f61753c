"""chat.embeddings: MiniLM vectors, similarities, projections and word arithmetic, checked against
scikit-learn and numpy where they compute the same thing."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.manifold import trustworthiness
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.neighbors import NearestNeighbors

from chat.embeddings import (
    EMBEDDING_DIM,
    PROJECTION_METHODS,
    cosine_similarity_matrix,
    embed,
    load_minilm,
    min_points,
    minilm_parameter_count,
    nearest_neighbours,
    project,
    word_arithmetic,
)


def clusters(n_per: int = 8, k: int = 3, dim: int = 64, seed: int = 0):
    """k well-separated Gaussian clusters in `dim` dimensions, with their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 4
    X = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres])
    return X.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_embed_gives_unit_vectors_and_similar_meanings_are_closer():
    vectors = embed(
        [
            "The sun is shining brightly.",
            "It is a bright, sunny day.",
            "Cats and dogs are popular pets.",
        ]
    )
    assert vectors.shape == (3, EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sim = cosine_similarity_matrix(vectors)
    assert sim[0, 1] > 0.6 > 0.2 > sim[0, 2]  # paraphrase vs the seed notes' unrelated pair


def test_embed_refuses_nothing():
    with pytest.raises(ValueError, match="at least one"):
        embed([])


def test_parameter_count_from_the_file_header_matches_the_loaded_model():
    loaded = sum(p.numel() for p in load_minilm().parameters())
    assert minilm_parameter_count() == loaded == 22_713_216


def test_cosine_similarity_matches_sklearn():
    X = np.random.default_rng(1).normal(size=(7, 5))
    np.testing.assert_allclose(cosine_similarity_matrix(X), cosine_similarity(X), atol=1e-12)
    with pytest.raises(ValueError, match="zero vector"):
        cosine_similarity_matrix(np.zeros((2, 3)))


def test_nearest_neighbours_match_sklearn():
    rng = np.random.default_rng(2)
    X, query = rng.normal(size=(30, 8)), rng.normal(size=8)
    ours = nearest_neighbours(query, X, k=5)
    reference = NearestNeighbors(n_neighbors=5, metric="cosine").fit(X)
    distances, indices = reference.kneighbors(query[None, :])
    assert [i for i, _ in ours] == indices[0].tolist()
    np.testing.assert_allclose([s for _, s in ours], 1 - distances[0], atol=1e-9)


def test_pca_projection_equals_the_top_singular_directions():
    X, _ = clusters()
    projection = project(X, "pca", 2)
    centred = X - X.mean(0)
    _, singular, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    expected = centred @ vt[:2].T
    # Each axis is determined up to its sign.
    signs = np.sign((projection.points * expected).sum(0))
    np.testing.assert_allclose(projection.points * signs, expected, atol=1e-3)
    variance = singular**2
    assert projection.explained_variance == pytest.approx(variance[:2].sum() / variance.sum(), 1e-4)


@pytest.mark.parametrize("method", ["tsne", "umap"])
@pytest.mark.parametrize("dims", [2, 3])
def test_neighbour_embeddings_keep_clusters_together(method, dims):
    X, labels = clusters()
    projection = project(X, method, dims, seed=0)
    assert projection.points.shape == (len(X), dims)
    assert np.isfinite(projection.points).all()
    # Each point's nearest neighbour in the picture is from its own cluster ...
    nn = NearestNeighbors(n_neighbors=2).fit(projection.points)
    neighbour = nn.kneighbors(projection.points, return_distance=False)[:, 1]
    assert (labels[neighbour] == labels).mean() == 1.0
    # ... and local neighbourhoods survive the projection.
    assert trustworthiness(X, projection.points, n_neighbors=5) > 0.9
    again = project(X, method, dims, seed=0)
    np.testing.assert_allclose(again.points, projection.points, atol=1e-5)  # seeded


@pytest.mark.parametrize("method", PROJECTION_METHODS)
@pytest.mark.parametrize("dims", [2, 3])
def test_projection_needs_enough_points_and_says_so(method, dims):
    needed = min_points(method, dims)
    X, _ = clusters(n_per=needed, k=1)
    assert project(X, method, dims).points.shape == (needed, dims)  # the minimum works
    with pytest.raises(ValueError, match=f"at least {needed} points, got {needed - 1}"):
        project(X[: needed - 1], method, dims)
    with pytest.raises(ValueError, match="at least"):
        project(X[:1], method, dims)  # a single sentence


def test_projection_parameters_are_checked():
    X, _ = clusters(n_per=4)  # 12 points
    with pytest.raises(
        ValueError, match=r"perplexity must be > 0 and < the number of points \(12\)"
    ):
        project(X, "tsne", perplexity=12)
    with pytest.raises(ValueError, match=r"n_neighbors must be >= 2 and < the number of points"):
        project(X, "umap", n_neighbors=12)
    with pytest.raises(ValueError, match="unknown projection 'mds'"):
        project(X, "mds")
    with pytest.raises(ValueError, match="2-D or 3-D"):
        project(X, "pca", dims=4)


def test_word_arithmetic_reports_what_minilm_really_returns():
    candidates = ["queen", "princess", "lady", "woman", "man", "king", "actress", "prince"]
    analogy = word_arithmetic(["king", "woman"], ["man"], candidates, k=3)
    ranked = [word for word, _ in analogy.ranking]
    assert ranked[0] == "queen"
    assert not {"king", "woman", "man"} & set(ranked)  # inputs are left out of the ranking ...
    inputs = dict(analogy.inputs)
    assert set(inputs) == {"king", "woman", "man"}  # ... and reported beside it
    # The honest part: the combined vector is closer to "king" itself than to "queen".
    assert inputs["king"] > analogy.ranking[0][1]
    scores = [s for _, s in analogy.ranking]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3


def test_word_arithmetic_bad_input():
    with pytest.raises(ValueError, match="at least one word to add"):
        word_arithmetic([" "], ["man"], ["queen"])
    with pytest.raises(ValueError, match="not one of the inputs"):
        word_arithmetic(["king"], ["man"], ["King", "man"])
