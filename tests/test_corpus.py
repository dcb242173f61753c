"""The bundled corpus: determinism, exact next-word probabilities, and loading a user's text."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from core.content.corpus import (
    END_OF_TEXT,
    TEMPLATES,
    CorpusError,
    Given,
    corpus_vocabulary,
    generate_documents,
    held_out_prefixes,
    join_words,
    load_text_corpus,
    next_word_distribution,
    preset_prefixes,
    split_words,
)


@pytest.fixture(scope="module")
def many_documents() -> list[list[str]]:
    return [split_words(d) for d in generate_documents(20_000, seed=7)]


def test_generation_is_deterministic_per_seed() -> None:
    assert generate_documents(50, seed=1) == generate_documents(50, seed=1)
    assert generate_documents(50, seed=1) != generate_documents(50, seed=2)
    assert generate_documents(10) == generate_documents(10, seed=0)


def test_split_and_join_are_inverse() -> None:
    assert split_words("The cat sat on the mat.") == ["The", "cat", "sat", "on", "the", "mat", "."]
    assert join_words(["Hi", ",", "Tom", "!"]) == "Hi, Tom!"
    for doc in generate_documents(1000, seed=3):
        assert join_words(split_words(doc)) == doc


def test_corpus_size_is_learnable(many_documents: list[list[str]]) -> None:
    assert 40 <= len(TEMPLATES) <= 80
    vocab = corpus_vocabulary()
    assert len(vocab) <= 700
    assert {w for doc in many_documents for w in doc} <= vocab
    lengths = [len(doc) for doc in many_documents]
    assert min(lengths) >= 5
    assert max(lengths) <= 80
    assert 15 <= sum(lengths) / len(lengths) <= 50


def test_templates_are_well_formed() -> None:
    """Every slot distribution sums to 1 and every conditional covers all values it may see."""
    for template in TEMPLATES:
        values: dict[str, set[str]] = {}
        for slot, spec in template.slots.items():
            dists = spec.table.values() if isinstance(spec, Given) else [spec]
            for dist in dists:
                assert math.isclose(sum(dist.values()), 1.0), (template.name, slot)
                assert all(p > 0 for p in dist.values()), (template.name, slot)
            if isinstance(spec, Given):
                assert values[spec.on] <= set(spec.table), (template.name, slot)
            values[slot] = {w for d in dists for w in d}


def test_the_cat_sat_on_the() -> None:
    dist = next_word_distribution("The cat sat on the")
    assert dist == pytest.approx({"mat": 0.4, "table": 0.2, "floor": 0.2, "chair": 0.1, "bed": 0.1})
    assert next(iter(dist)) == "mat"  # sorted by probability
    # The same prefix continues differently for another animal: the model must look back.
    assert "branch" in next_word_distribution("The bird sat on the")
    assert "branch" not in dist
    after = next_word_distribution("The cat sat on the mat")
    assert after == pytest.approx({".": 1.0})
    end = next_word_distribution("The cat sat on the mat.")
    assert set(end) == {END_OF_TEXT, "It"}
    assert 0 < end[END_OF_TEXT] < 1


def test_story_reuses_the_characters_name() -> None:
    prefix = (
        "Once upon a time, there was a little fox named Sam. Sam lived in a den near the lake. "
        "Every morning,"
    )
    assert next_word_distribution(prefix) == {"Sam": 1.0}
    assert next_word_distribution(prefix + " Sam went to the") == {"lake": 1.0}
    # The pronoun agrees with the name picked earlier.
    assert next_word_distribution("It was a cold day. Lily wanted to go to the zoo.") == {
        "She": 1.0
    }


def test_distributions_sum_to_one() -> None:
    for prefix in held_out_prefixes(300) + preset_prefixes():
        dist = next_word_distribution(prefix)
        assert abs(sum(dist.values()) - 1.0) < 1e-9
        assert all(p > 0 for p in dist.values())


def _document_probability(words: list[str]) -> float:
    """Reference P(document) read straight off the templates: Σ_T P(T) · Π P(slot value)."""
    total_weight = sum(t.weight for t in TEMPLATES)
    total = 0.0
    for template in TEMPLATES:
        if len(template.items) != len(words):
            continue
        p = template.weight / total_weight
        bound: dict[str, str] = {}
        for item, word in zip(template.items, words, strict=True):
            slot = item[1:-1] if item.startswith("{") else None
            if slot is None or slot in bound:
                p *= word == (item if slot is None else bound[slot])
                continue
            spec = template.slots[slot]
            dist = spec.table.get(bound[spec.on], {}) if isinstance(spec, Given) else spec
            p *= dist.get(word, 0.0)
            bound[slot] = word
        total += p
    return total


def test_chain_rule_reproduces_document_probabilities() -> None:
    """Every word of a generated document is possible, and Π P(word | prefix) = P(document).

    The product only telescopes to the right value if every conditional weighs each template by
    P(template) · P(prefix | template), so this checks the marginalisation exactly.
    """
    for doc in generate_documents(300, seed=11):
        words = split_words(doc)
        chain = 1.0
        for i, word in enumerate([*words, END_OF_TEXT]):
            p = next_word_distribution(join_words(words[:i])).get(word, 0.0)
            assert p > 0, (doc, i)
            chain *= p
        assert chain == pytest.approx(_document_probability(words), rel=1e-9), doc


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "The",
        "The cat sat on the",
        "The cat sat on the mat.",
        "It was a rainy day.",
        "A temperature above one makes the distribution flatter, so the output is more",
    ],
)
def test_matches_empirical_next_word_frequencies(
    prefix: str, many_documents: list[list[str]]
) -> None:
    target = split_words(prefix)
    k = len(target)
    counts = Counter(
        (doc[k] if k < len(doc) else END_OF_TEXT) for doc in many_documents if doc[:k] == target
    )
    n = sum(counts.values())
    assert n >= 150, "too few samples for a meaningful check"
    exact = next_word_distribution(prefix)
    assert set(counts) <= set(exact)
    for word in set(exact) | set(counts):
        p = exact.get(word, 0.0)
        # 5 standard errors of a binomial proportion, plus slack for probabilities near 0.
        tolerance = 5 * math.sqrt(p * (1 - p) / n) + 2 / n
        assert abs(counts[word] / n - p) <= tolerance, (prefix, word, counts[word] / n, p)


@pytest.mark.parametrize(
    "prefix", ["Tom sat on the", "The cat sat on the moon", "The cat sat on th", "Hello"]
)
def test_impossible_prefix_raises(prefix: str) -> None:
    with pytest.raises(ValueError, match="no template"):
        next_word_distribution(prefix)


def test_held_out_prefixes() -> None:
    prefixes = held_out_prefixes(500)
    assert len(prefixes) == 500
    assert prefixes == held_out_prefixes(500)
    assert prefixes != held_out_prefixes(500, seed=99)
    assert "" in prefixes
    # Some prefixes are whole documents, where the document may end.
    assert any(END_OF_TEXT in next_word_distribution(p) for p in prefixes if p)
    for prefix in prefixes:
        assert join_words(split_words(prefix)) == prefix


def test_preset_prefixes_are_valid_and_instructive() -> None:
    presets = preset_prefixes()
    assert 6 <= len(presets) <= 12
    assert "The cat sat on the" in presets
    dists = [next_word_distribution(p) for p in presets]
    # A mix of certain and uncertain next words.
    assert sum(len(d) == 1 for d in dists) >= 2
    assert sum(len(d) >= 3 for d in dists) >= 3


# --- load_text_corpus ---------------------------------------------------------------------------


def test_load_single_file_strips_whitespace(tmp_path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("\n  # Notes\nSome text.  \n\n", encoding="utf-8")
    assert load_text_corpus(path) == ["# Notes\nSome text."]
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello".encode())
    assert load_text_corpus(str(bom)) == ["hello"]


def test_load_folder_recursively_in_sorted_order(tmp_path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.md").write_text("first", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "data.csv").write_text("ignored", encoding="utf-8")
    assert load_text_corpus(tmp_path) == ["first", "second", "third"]


def test_missing_path(tmp_path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match=r"nope\.txt: no such file"):
        load_text_corpus(missing)


def test_folder_without_text_files(tmp_path) -> None:
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"no \.txt or \.md files"):
        load_text_corpus(tmp_path)


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file(tmp_path, content: str) -> None:
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "empty.txt").write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=r"empty\.txt: file is empty"):
        load_text_corpus(tmp_path)


def test_non_utf8_file(tmp_path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt: not valid UTF-8") as info:
        load_text_corpus(path)
    assert "0xe9 at offset 3" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_unsupported_file_type(tmp_path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"table\.csv: expected a \.txt or \.md file"):
        load_text_corpus(path)
