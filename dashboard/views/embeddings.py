"""Embeddings: MiniLM sentence vectors of preset and your own sentences, projected to 2-D/3-D with
PCA, t-SNE or UMAP; cosine similarities; nearest neighbours; word arithmetic."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from chat.embeddings import (
    EMBEDDING_DIM,
    cosine_similarity_matrix,
    min_points,
    nearest_neighbours,
    project,
    word_arithmetic,
)
from dashboard.lib.embeddings import (
    ANALOGIES,
    DEFAULT_CANDIDATES,
    PRESETS,
    SEED_PAIR,
    heatmap_figure,
    neighbour_rows,
    parse_sentences,
    preset_sentences,
    projection_figure,
    selected_index,
)
from dashboard.resources import sentence_vectors, warm_up_in_background

METHODS = {"PCA": "pca", "t-SNE": "tsne", "UMAP": "umap"}


@st.cache_data(show_spinner=False, max_entries=64)
def cached_projection(texts: tuple[str, ...], method, dims, perplexity, n_neighbors):
    return project(
        sentence_vectors(texts), method, dims, perplexity=perplexity, n_neighbors=n_neighbors
    )


@st.cache_data(show_spinner=False, max_entries=64)
def cached_analogy(positive: tuple[str, ...], negative: tuple[str, ...], candidates, k):
    return word_arithmetic(list(positive), list(negative), list(candidates), k)


warm_up = warm_up_in_background()  # loads MiniLM and compiles UMAP once per server process

st.title("Embeddings")
st.markdown(
    f"An **embedding** turns a text into a list of numbers, a point in space, such that texts "
    f"with similar meanings land close together. Here all-MiniLM-L6-v2 (a 6-layer transformer "
    f"encoder, trained on over a billion sentence pairs to put related sentences near each "
    f"other) reads each sentence and returns **{EMBEDDING_DIM} numbers**: its token vectors, "
    f"averaged and scaled to length 1. The closeness of two sentences is the **cosine "
    f"similarity** of their vectors, the cosine of the angle between them (not the angle "
    f"itself): 1 for the same direction, 0 at right angles (unrelated), -1 for opposite. "
    f"Learning such vectors from data, instead of designing features by hand, is called "
    f"**representation learning**; every deep network does it in its layers."
)
st.caption(
    "The dimensions have no names: no single number means 'size' or 'topic'. Meaning is spread "
    "over all of them, which is why we project them to 2-D or 3-D below to look at them. "
    "Larger embedding models use more numbers (OpenAI's text-embedding-ada-002: 1,536)."
)

with st.spinner("Loading all-MiniLM-L6-v2 ..."):
    pair = sentence_vectors((*SEED_PAIR, "It is a bright, sunny day."))
similarity = cosine_similarity_matrix(pair)
a, b = st.columns(2)
a.metric(f'"{SEED_PAIR[0]}" vs "{SEED_PAIR[1]}"', f"{similarity[0, 1]:.2f}")
b.metric(f'"{SEED_PAIR[0]}" vs "It is a bright, sunny day."', f"{similarity[0, 2]:.2f}")

st.header("Your sentences")
topics = st.multiselect("Preset sentences", list(PRESETS), default=list(PRESETS))
presets = preset_sentences(topics)
own_text = st.text_area(
    "Your own sentences, one per line",
    placeholder="The weather is lovely today.\nMy cat ignores me.",
    height=100,
)
own = parse_sentences(own_text, already=[s for s, _ in presets])
for note in own.notes:
    st.warning(note)
sentences = [s for s, _ in presets] + own.sentences
groups = [t for _, t in presets] + ["yours"] * len(own.sentences)
if not sentences:
    st.info("Pick some preset sentences or type your own (one per line) to see their embeddings.")
    st.stop()
vectors = sentence_vectors(tuple(sentences))
st.caption(f"{len(sentences)} sentences, each now a vector of {vectors.shape[1]} numbers.")

st.header("Projection to 2-D or 3-D")
c1, c2, c3 = st.columns([2, 1, 2])
method_name = c1.radio("Method", list(METHODS), horizontal=True)
method = METHODS[method_name]
dims = 3 if c2.radio("Dimensions", ["2-D", "3-D"], horizontal=True) == "3-D" else 2
n = len(sentences)
needed = min_points(method, dims)
perplexity = n_neighbors = None
if n < needed:
    st.info(
        f"{method_name} in {dims}-D needs at least {needed} sentences; you have {n}. "
        "Add sentences or pick more presets."
    )
else:
    if method == "tsne":
        perplexity = c3.slider(
            "Perplexity (about how many neighbours each point cares about)",
            1,
            n - 1,
            min(5, n - 1),
            help="t-SNE requires perplexity < the number of points.",
        )
    elif method == "umap":
        n_neighbors = c3.slider(
            "Neighbours (small = local detail, large = global shape)",
            2,
            n - 1,
            min(5, n - 1),
            help="UMAP requires 2 <= n_neighbors < the number of points.",
        )
    spinner = (
        "Compiling UMAP (first use after start-up only) ..."
        if method == "umap" and warm_up.is_alive()
        else "Projecting ..."
    )
    with st.spinner(spinner):
        projection = cached_projection(tuple(sentences), method, dims, perplexity, n_neighbors)
    figure = projection_figure(projection.points, sentences, groups, method)
    if dims == 2:
        event = st.plotly_chart(
            figure, width="stretch", on_select="rerun", selection_mode="points", key="emb_map"
        )
        picked = selected_index(event)
        if picked != st.session_state.get("emb_clicked"):  # a new click, not an old selection
            st.session_state["emb_clicked"] = picked
            if picked is not None and picked < n:
                st.session_state["emb_pick"] = picked
    else:
        st.plotly_chart(figure, width="stretch", key="emb_map_3d")
    st.caption(
        "Points are numbered as in the lists and the heatmap below; hover for the sentence"
        + (", click it to list its nearest neighbours." if dims == 2 else ".")
    )
    if method == "pca":
        st.caption(
            f"PCA is a rotation that keeps the directions of largest spread. These {dims} axes "
            f"keep **{projection.explained_variance:.0%}** of the variance of the "
            f"{EMBEDDING_DIM}-D vectors; the rest is flattened away, so points that overlap "
            "here can be far apart in the full space."
        )
    else:
        st.caption(
            f"{method_name} bends the space to keep each point's nearest neighbours near it. "
            "Clusters are meaningful; distances between clusters and the axes are not. Change "
            "the slider and the picture changes, while the embeddings stay the same."
        )

if n >= 2:
    similarities = cosine_similarity_matrix(vectors)
    st.subheader("Nearest neighbours of one sentence")
    if st.session_state.get("emb_pick", 0) >= n:
        st.session_state["emb_pick"] = 0
    pick = st.selectbox(
        "Sentence (or click a point on the 2-D map)",
        range(n),
        format_func=lambda i: f"{i + 1}. {sentences[i]}",
        key="emb_pick",
    )
    st.dataframe(
        pd.DataFrame(neighbour_rows(similarities, sentences, pick, min(5, n - 1))),
        hide_index=True,
        width="stretch",
    )
    st.caption(
        "Closeness is measured in the full 384-D space (cosine similarity), not on the map: "
        "a projection can put true neighbours apart."
    )

    st.header("Cosine similarity of every pair")
    st.plotly_chart(heatmap_figure(similarities, sentences), width="stretch")
    money, other_money, river = (
        "The bank raised its interest rates.",
        "She saved money in her bank account.",
        "We had a picnic on the river bank.",
    )
    if {money, other_money, river} <= set(sentences):
        i, j, r = (sentences.index(s) for s in (money, other_money, river))
        same, other = similarities[i, j], similarities[i, r]
        lead = "Context, not the shared word, decides" if same > other else "Here the word wins"
        st.caption(
            f"{lead}: '{money}' has similarity {same:.2f} with '{other_money}' and "
            f"{other:.2f} with '{river}', although all three contain 'bank'."
        )

st.header("Nearest neighbours: search by meaning")
q1, q2 = st.columns([3, 1])
query = q1.text_input("Query", value="Will it rain later?")
k = q2.slider("How many", 1, min(10, n), min(5, n)) if n > 1 else 1
if not query.strip():
    st.info("Type a query to find the sentences closest in meaning.")
else:
    hits = nearest_neighbours(sentence_vectors((query.strip(),))[0], vectors, k)
    st.dataframe(
        pd.DataFrame(
            [
                {"rank": r + 1, "cosine similarity": round(s, 3), "sentence": sentences[i]}
                for r, (i, s) in enumerate(hits)
            ]
        ),
        hide_index=True,
        width="stretch",
    )
    st.caption(
        "This is how semantic search and retrieval-augmented generation (RAG) find passages: "
        "the query shares few words with the best matches, but its meaning is close."
    )

st.header("Arithmetic with word vectors")
st.markdown(
    "Word2vec (2013) became famous for *king − man + woman ≈ queen*. MiniLM embeds sentences, "
    "but single words work too. Below, the three words' vectors are combined and every "
    "candidate word is ranked by cosine similarity with the result."
)
presets_text = [f"{a} − {b} + {c}" for a, b, c in ANALOGIES]
choice = st.selectbox("Try", presets_text)
base, minus, plus = ANALOGIES[presets_text.index(choice)]
w1, w2, w3 = st.columns(3)
first = w1.text_input("Start from", value=base, key=f"first::{choice}")
second = w2.text_input("minus", value=minus, key=f"second::{choice}")
third = w3.text_input("plus", value=plus, key=f"third::{choice}")
candidates = st.text_area(
    "Candidate words (separated by spaces or new lines)", value=" ".join(DEFAULT_CANDIDATES)
).split()
try:
    analogy = cached_analogy((first, third), (second,), tuple(candidates), 8)
except ValueError as error:
    st.info(str(error))
else:
    r1, r2 = st.columns(2)
    with r1:
        st.markdown("**Best candidates** (input words left out)")
        st.dataframe(
            pd.DataFrame(analogy.ranking, columns=["word", "cosine similarity"]).round(3),
            hide_index=True,
            width="stretch",
        )
    with r2:
        st.markdown("**The input words themselves**")
        st.dataframe(
            pd.DataFrame(analogy.inputs, columns=["word", "cosine similarity"]).round(3),
            hide_index=True,
            width="stretch",
        )
    top_input = max(analogy.inputs, key=lambda item: item[1])
    best = analogy.ranking[0]
    verdict = (
        f"MiniLM's answer is **{best[0]}** ({best[1]:.2f}) among the candidates"
        if best[1] >= top_input[1]
        else f"The best candidate is **{best[0]}** ({best[1]:.2f}), but the input word "
        f"**{top_input[0]}** scores higher ({top_input[1]:.2f})"
    )
    st.markdown(
        f"{verdict}. Analogy tests leave the input words out because the combined vector "
        "stays close to its own ingredients; without that rule the 'answer' is usually one "
        "of the inputs. The result also depends entirely on the candidate list."
    )
