"""Grounding: the project's own concept explanations (`core.content.concepts`) in a LangChain vector store,
embedded with all-MiniLM-L6-v2, so answers can cite the dashboard page they come from."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore

from core.train.data import DATA_DIR


class MiniLMEmbeddings(Embeddings):
    """LangChain embeddings over `chat.embeddings` (the bundled all-MiniLM-L6-v2, loaded once per
    process and shared with the dashboard). Vectors are unit length, so cosine = dot product."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        from chat.embeddings import embed

        return embed(texts).tolist() if texts else []

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def concept_documents(concepts: Sequence | None = None) -> list[Document]:
    """One document per concept; the metadata says where the dashboard shows it."""
    if concepts is None:
        from core.content.concepts import CONCEPTS

        concepts = CONCEPTS
    return [
        Document(
            id=c.id,
            page_content=f"{c.title}. {c.text}",
            metadata={"id": c.id, "title": c.title, "page": c.page, "text": c.text},
        )
        for c in concepts
    ]


# Below this score (see ConceptRetriever) a note is not about the question. Measured with
# chat.bot.best_threshold on the bot's hand-written training questions (in-scope ones scored
# leave-one-out, so a question never meets itself among the examples; 52 out-of-scope ones),
# never on the held-out ones: 0.28 makes the fewest mistakes (5 of 318) on a 0.01 grid with the
# example weight below. tests/test_bot.py recomputes it.
RELEVANCE_THRESHOLD = 0.28

# How much a concept's example questions count next to its note (0: the note alone). Picked by
# leave-one-out on the training questions (right concept first: 86.5% with the note alone,
# 88.3% at 0.3, 88.7% at 0.4 and 0.5, 86.8% at 0.6, 85.7% at 0.7); tests/test_bot.py
# recomputes the comparison.
EXAMPLE_WEIGHT = 0.5
EXAMPLES_FILE = DATA_DIR / "bot_train.jsonl"


def bundled_examples(path: Path = EXAMPLES_FILE) -> list[tuple[str, str]]:
    """(question, concept id) for every in-scope training question of the demo bot."""
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
    return [(r["question"], r["concept"]) for r in rows if r.get("concept")]


class ConceptRetriever:
    """The `k` concepts most relevant to a question, dropping those scoring below `min_score`,
    so small talk ("hello") cites nothing.

    A concept's score mixes two cosine similarities (MiniLM): to its note, and to the closest of
    its example questions (people ask about an idea in words its note does not use, and a
    question is often closest to another question):
        score = (1 - w) * note + w * max(note, best example),   w = `example_weight`.
    Examples are the bot's training questions by default (only when `concepts` is not given);
    `leave_out` skips an example equal to the question, for scoring training questions as if
    they were new."""

    def __init__(
        self,
        concepts: Sequence | None = None,
        k: int = 2,
        min_score: float = RELEVANCE_THRESHOLD,
        embeddings: Embeddings | None = None,
        examples: Sequence[tuple[str, str]] | None = None,
        example_weight: float = EXAMPLE_WEIGHT,
    ) -> None:
        self.k, self.min_score, self.example_weight = k, min_score, example_weight
        if examples is None:
            examples = bundled_examples() if concepts is None else ()
        documents = concept_documents(concepts)
        if not documents:
            raise ValueError("no concepts to retrieve from")
        self.notes = {d.id: d for d in documents}
        self.store = InMemoryVectorStore(embeddings or MiniLMEmbeddings())
        self.store.add_documents(documents)
        self.store.add_documents(
            [
                Document(page_content=q, metadata={"example_of": c})
                for q, c in examples
                if c in self.notes
            ]
        )

    def ranked(self, question: str, leave_out: bool = False) -> list[Document]:
        """Every concept's note, best first; metadata gains `score` (the mix above)."""
        # The store is small (a few hundred short texts): score them all.
        hits = self.store.similarity_search_with_score(question, k=len(self.store.store))
        note_score, example_score = {}, {}
        for doc, s in hits:
            of = doc.metadata.get("example_of")
            if of is None:
                note_score[doc.id] = s
            elif not (leave_out and doc.page_content == question):
                example_score[of] = max(s, example_score.get(of, -1.0))
        w = self.example_weight
        scores = {
            cid: (1 - w) * s + w * max(s, example_score.get(cid, -1.0))
            for cid, s in note_score.items()
        }
        return [
            Document(id=cid, page_content=self.notes[cid].page_content,
                     metadata={**self.notes[cid].metadata, "score": scores[cid]})
            for cid in sorted(scores, key=scores.get, reverse=True)
        ]  # fmt: skip

    def nearest(self, question: str, leave_out: bool = False) -> Document:
        """The single most relevant concept whatever its score."""
        return self.ranked(question, leave_out)[0]

    def search(self, question: str, leave_out: bool = False) -> list[Document]:
        """The top `k` concepts scoring at least `min_score`, best first."""
        return [
            d
            for d in self.ranked(question, leave_out)[: self.k]
            if d.metadata["score"] >= self.min_score
        ]
