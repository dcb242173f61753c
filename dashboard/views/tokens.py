"""Tokens: your text split by our byte-level BPE and by MiniLM's WordPiece, side by side; why
models read tokens and not words; tokens vs parameters with published figures."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from core.content import corpus
from core.models import resolve_model_path
from dashboard.lib.tokens import (
    MAX_CHARS,
    bpe_segments,
    cap_text,
    scale_rows,
    segment_rows,
    segments_html,
    summarize,
    wordpiece_segments,
)
from dashboard.resources import tutor_tokenizer, wordpiece_tokenizer

EXAMPLES = {
    "A sentence from our corpus": "The cat sat on the mat. Then it yawned, and the cat went to sleep.",
    "Words it has never seen": "Tokenization of unbelievably long, unseen words: antidisestablishmentarianism!",
    "Code and whitespace": 'def greet(name):\n    return f"Hello, {name}!"\n\nprint(greet("Ada"))',
    "Numbers": "In 2024, 1234 + 5678 = 6912 and 3.14159 is close to π.",
    "Other scripts and emoji": "Café naïve — 東京は晴れ。 Привет, мир! مرحبا 🙂👍🏽",
}

st.title("Tokens")
st.markdown(
    "A language model never sees letters or words. A **tokenizer** first cuts the text into "
    "pieces from a fixed vocabulary and replaces each piece by its number (its **id**); the "
    "model reads and writes those numbers. Type below and compare two real tokenizers."
)

example = st.selectbox("Start from an example", list(EXAMPLES))
raw = st.text_area("Text to tokenize", value=EXAMPLES[example], height=110, key=f"text::{example}")
text, was_cut = cap_text(raw)
if was_cut:
    st.warning(
        f"The text has {len(raw):,} characters; this page tokenizes the first {MAX_CHARS:,} only."
    )
if not text:
    st.info("Type some text (or pick an example) to see how it is split into tokens.")
    st.stop()

bpe, wordpiece = tutor_tokenizer("tutor-base"), wordpiece_tokenizer()
views = (
    (
        "Our tutor: byte-level BPE",
        f"{len(bpe):,} tokens in the vocabulary, learnt from the bundled corpus",
        bpe_segments(bpe, text),
    ),
    (
        "MiniLM: WordPiece (BERT, uncased)",
        f"{len(wordpiece):,} tokens in the vocabulary, BERT's uncased vocabulary (2018)",
        wordpiece_segments(wordpiece, text),
    ),
)
st.caption(
    "Whitespace is shown as · (space), → (tab) and ↵ (newline). Hover over a token for its id. "
    "Grey struck-through text was dropped by the tokenizer; a dashed box is one byte of a "
    "character the tokenizer split into bytes; red is [UNK], text the tokenizer cannot represent."
)
columns = st.columns(2)
for column, (title, about, segments) in zip(columns, views, strict=True):
    summary = summarize(text, segments)
    with column:
        st.subheader(title)
        st.caption(about)
        a, b, c = st.columns(3)
        a.metric("tokens", summary.tokens)
        b.metric("characters per token", f"{summary.chars_per_token:.2f}")
        c.metric("unknown [UNK]", summary.unknown)
        st.html(segments_html(text, segments))
        st.code(" ".join(str(s.token_id) for s in segments), language=None, wrap_lines=True)
        with st.expander("Every token"):
            st.dataframe(pd.DataFrame(segment_rows(segments, text)), hide_index=True)

bpe_summary, wp_summary = (summarize(text, segments) for _, _, segments in views)
notes = []
if bpe_summary.byte_pieces:
    notes.append(
        f"**BPE** split {bpe_summary.byte_pieces} token(s) below the character level: characters "
        "its vocabulary never learnt (our corpus is plain English) are spelled as their UTF-8 "
        "bytes (1–4 per character), so it can still encode, and decode back, any text exactly."
    )
if wp_summary.unknown:
    notes.append(
        f"**WordPiece** replaced {wp_summary.unknown} piece(s) with [UNK]: its vocabulary has no "
        "entry for those characters and, unlike byte-level BPE, no bytes to fall back on. "
        "Whatever was there is lost to the model."
    )
if wp_summary.dropped:
    notes.append(
        "**WordPiece** drops all whitespace (and lowercases and strips accents), so it cannot "
        "give you the original text back; that suits an embedding model, which only needs the "
        "meaning. A generative model must write text, so its tokenizer keeps every byte."
    )
for note in notes:
    st.markdown("- " + note)

st.header("Why tokens, and not words or letters?")
words = text.split()
vocabulary = corpus.corpus_vocabulary()
unseen = sorted({w for w in corpus.split_words(text) if w not in vocabulary})
unseen_list = ", ".join(f"`{w}`" for w in unseen[:12]) + (" ..." if len(unseen) > 12 else "")
c1, c2, c3, c4 = st.columns(4)
c1.metric("UTF-8 bytes", len(text.encode("utf-8")))
c2.metric("characters", len(text))
c3.metric("words (split at spaces)", len(words))
c4.metric("BPE tokens", bpe_summary.tokens)
st.markdown(
    f"""
- **Letters or bytes** would need a tiny vocabulary, but sequences get long: this text is
  {len(text.encode("utf-8")):,} bytes against {bpe_summary.tokens:,} tokens. Attention compares
  every position with every other, so cost grows with the square of the length, and the context
  window (how many tokens a model reads at once) fills up sooner.
- **Whole words** would need an enormous vocabulary and still fail on new words, names, typos and
  other languages. A word-level model trained on our corpus would know exactly its
  {len(vocabulary):,} words and punctuation marks; {len(unseen)} word(s) of your text are not
  among them{f" ({unseen_list})" if unseen else ""}.
  The BPE tokenizer still encodes all of them, from smaller pieces.
- **Subword tokens** are the compromise: frequent words become one token, rare words a few
  pieces. BPE (byte-pair encoding) learns them by repeatedly merging the most frequent
  adjacent pair in the training text; GPT-2, Llama 3 and our tutor use byte-level BPE.

A token does not fix a word's meaning: "bank" is the same token in "river bank" and
"bank account". The model's layers work out the meaning from the context (see the
Embeddings page, where whole sentences get vectors).
"""
)

st.header("Tokens vs parameters")
st.markdown(
    "Three different numbers are often mixed up. **Parameters** are the numbers the model "
    "learnt (its weights): they set its size in memory. **Training tokens** are how much text it "
    "read while learning. The **context window** is how many tokens it can read at once when you "
    "use it. Chinchilla (2022) found that, for a fixed compute budget, about 20 training tokens "
    "per parameter gives the best model; newer small models are trained far past that because "
    "they are cheaper to run."
)
report = json.loads(
    (resolve_model_path("tutor-base") / "training_report.json").read_text(encoding="utf-8")
)
st.table(
    pd.DataFrame(scale_rows(report, report["config"]["context_length"])),
    hide_index=True,
)
st.caption(
    "GPT-4's parameter and token counts have never been published by OpenAI; figures quoted "
    "online (e.g. 1.76 trillion parameters) are unconfirmed. Llama 3 8B/70B: Meta states "
    "'over 15 trillion' tokens. Sizes are the models' names: LLaMA 7B, for one, has 6.7B "
    "parameters."
)
