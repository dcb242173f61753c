"""Dashboard pages render without exceptions and react to their controls (Streamlit AppTest), and
the library code behind them (dashboard/lib) is right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
from streamlit.testing.v1 import AppTest

from core.models import resolve_model_path
from core.tokenizer import load_tokenizer
from dashboard.lib import embeddings_view, taxonomy, tokens

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "dashboard" / "views"


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=120)
    return at.run()


def charts(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def by_label(elements, label: str):
    return next(e for e in elements if e.label == label)


# -- home ---------------------------------------------------------------------------------------


def test_app_entry_point_renders_home_with_links_to_the_built_pages():
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    assert not at.exception
    assert at.title[0].value == "genai-lab"
    links = {link.proto.page for link in at.get("page_link")}
    assert {"taxonomy", "tokens", "embeddings"} <= links  # the pages' URL paths
    built = {p.stem for p in PAGES.glob("*.py")}
    assert links <= built  # a page that is not built yet is plain text, not a dead link


def test_home_generates_and_reacts_to_the_prompt():
    at = page("home")
    assert not at.exception
    first = at.markdown[-1].value
    assert first.startswith("**The cat sat on the**")
    assert len(first) > len("**The cat sat on the**") + 5  # the model added text
    at.text_input[0].set_value("Once upon a time").run()
    assert not at.exception
    assert at.markdown[-1].value.startswith("**Once upon a time**")


def test_home_lists_what_runs_locally_with_measured_sizes():
    at = page("home")
    table = at.table[0].value
    sizes = dict(zip(table["model"], table["parameters"], strict=True))
    report = json.loads((resolve_model_path("tutor-base") / "training_report.json").read_text())
    assert sizes["tutor-base"] == f"{report['parameters']:,}"
    assert sizes["all-MiniLM-L6-v2"] == "22,713,216"


@pytest.mark.parametrize("text", ["", "The cat " * 200])
def test_home_handles_empty_and_too_long_text(text):
    at = page("home")
    at.text_input[0].set_value(text).run()
    assert not at.exception
    messages = [m.value for m in (*at.info, *at.warning)]
    assert messages, "the page must say what is wrong"


# -- taxonomy -----------------------------------------------------------------------------------


def test_taxonomy_renders_and_every_control_changes_the_output():
    at = page("taxonomy")
    assert not at.exception
    nesting, comparison, _ = charts(at)
    assert nesting["data"][0]["type"] == "treemap"
    at.radio[0].set_value("sunburst").run()
    assert charts(at)[0]["data"][0]["type"] == "sunburst"

    by_label(at.selectbox, "Look closer at").set_value("Machine learning").run()
    assert any(m.value.startswith("**Machine learning.**") for m in at.markdown)

    by_label(at.slider, "New points to generate").set_value(150).run()
    after = charts(at)[1]
    assert after != comparison
    assert "150 new points" in json.dumps(after["layout"]["annotations"])

    at.multiselect[0].set_value([]).run()
    assert not at.exception
    assert at.info and len(charts(at)) == 2  # no timeline, and the page says why


def test_taxonomy_shows_that_a_straight_border_fails_on_circles():
    at = page("taxonomy")
    by_label(at.selectbox, "Toy data").set_value("circles").run()
    linear = metrics(at)
    by_label(at.selectbox, "Discriminative model").set_value("support vector machine (RBF)").run()
    curved = metrics(at)
    assert not at.exception
    accuracy = "Classifier accuracy (held-out 30%)"
    assert float(linear[accuracy].rstrip("%")) < 70 < 90 < float(curved[accuracy].rstrip("%"))
    assert float(curved["Generative model as a classifier"].rstrip("%")) > 90


def test_class_conditional_gmm_agrees_with_qda_when_it_has_one_gaussian():
    X, y = taxonomy.toy_data("blobs", n=2000, noise=0.3, seed=1)
    ours = taxonomy.ClassConditionalGMM(n_components=1).fit(X, y)
    qda = QuadraticDiscriminantAnalysis().fit(X, y)  # one Gaussian per class, by Bayes' rule
    grid = np.random.default_rng(0).uniform(-3, 3, size=(500, 2))
    np.testing.assert_allclose(ours.predict_proba(grid), qda.predict_proba(grid), atol=0.02)
    assert (ours.predict(grid) == qda.predict(grid)).mean() > 0.99


def test_class_conditional_gmm_samples_follow_the_learnt_distribution():
    X, y = taxonomy.toy_data("two moons", n=600, noise=0.1, seed=0)
    model = taxonomy.ClassConditionalGMM(n_components=4).fit(X, y)
    samples, labels = model.sample(4000, seed=3)
    assert samples.shape == (4000, 2) and set(labels) == {0, 1}
    assert abs((labels == 1).mean() - (y == 1).mean()) < 0.03  # class priors
    for c in (0, 1):  # each class's samples have that class's mean
        np.testing.assert_allclose(samples[labels == c].mean(0), X[y == c].mean(0), atol=0.08)
    # the generative model labels its own samples correctly most of the time
    assert (model.predict(samples) == labels).mean() > 0.9
    assert model.sample(0)[0].shape == (0, 2)


def test_taxonomy_facts():
    years = {e["event"]: e["year"] for e in taxonomy.TIMELINE}
    assert years["Perceptron"] == 1958
    assert years["Backpropagation popularised"] == 1986
    assert years["Variational autoencoder (VAE)"] == 2013
    assert years["GAN"] == 2014
    assert years["Transformer"] == 2017
    assert years["GPT-1"] == years["BERT"] == 2018
    assert years["GPT-3"] == 2020
    assert years["LoRA"] == 2021
    assert years["InstructGPT (RLHF)"] == years["ChatGPT"] == 2022
    assert years["QLoRA"] == 2023
    modalities = {row["modality"]: row["examples"] for row in taxonomy.MODALITIES}
    assert "DALL·E 3" in modalities["text → image"] and "DALL·E" not in modalities["image → text"]
    assert "Whisper" in modalities["speech → text"]
    with pytest.raises(ValueError, match="unknown dataset"):
        taxonomy.toy_data("spirals")


# -- tokens -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer(resolve_model_path("tutor-base"))


@pytest.fixture(scope="module")
def wordpiece():
    from transformers import AutoTokenizer

    from core.embeddings import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def test_tokens_page_reacts_to_text():
    at = page("tokens")
    assert not at.exception
    assert len(at.html) == 2  # the two coloured views
    before = metrics(at)
    at.text_area[0].set_value("The cat. THE CAT.").run()
    assert not at.exception
    assert metrics(at) != before
    assert ">CAT<" not in at.html[1].value and ">cat<" in at.html[1].value  # lowercased
    assert ">·cat<" in at.html[0].value  # BPE keeps the space, shown as ·


def test_tokens_page_handles_other_scripts_and_emoji():
    at = page("tokens")
    at.selectbox[0].set_value("Other scripts and emoji").run()
    assert not at.exception
    notes = " ".join(m.value for m in at.markdown)
    assert "[UNK]" in notes and "bytes" in notes
    assert "→[UNK]" in at.html[1].value and "⟨" in at.html[0].value


def test_tokens_page_empty_and_too_long_text():
    at = page("tokens")
    at.text_area[0].set_value("").run()
    assert not at.exception and at.info
    at.text_area[0].set_value("word " * 1000).run()
    assert not at.exception
    assert any(f"{tokens.MAX_CHARS:,}" in w.value for w in at.warning)


@pytest.mark.parametrize(
    "text",
    ["The cat sat.", "  two  spaces\n\tand a tab", "naïve café 東京 🙂👍🏽 مرحبا", "<b>&amp;"],
)
def test_bpe_segments_cover_the_text_byte_for_byte(bpe, text):
    segments = tokens.bpe_segments(bpe, text)
    assert b"".join(tokens.bpe_token_bytes(s.token) for s in segments) == text.encode("utf-8")
    assert [s.token_id for s in segments] == bpe.encode(text, add_special_tokens=False)
    assert tokens.summarize(text, segments).dropped == ""  # byte-level BPE drops nothing
    html = tokens.segments_html(text, segments)
    assert "<b>" not in html  # the text is escaped
    for s in segments:  # hover titles carry ids
        assert f"id {s.token_id} " in html


def test_bpe_shows_split_characters_as_bytes(bpe):
    segments = tokens.bpe_segments(bpe, "🙂")
    assert [s.label for s in segments] == ["⟨f0⟩", "⟨9f⟩", "⟨99⟩", "⟨82⟩"]
    assert all(s.kind == "bytes" for s in segments)
    assert tokens.readable_bytes("é".encode()) == ("é", False)


def test_wordpiece_segments_show_unknowns_lowercase_and_dropped_space(wordpiece):
    text = "Hello  🙂\ntokenization"
    segments = tokens.wordpiece_segments(wordpiece, text)
    assert [s.label for s in segments] == ["hello", "🙂", "token", "##ization"]
    assert [s.kind for s in segments] == ["text", "unknown", "text", "text"]
    summary = tokens.summarize(text, segments)
    assert summary.unknown == 1 and summary.dropped == "  \n"
    html = tokens.segments_html(text, segments)
    assert "🙂→[UNK]" in html and "line-through" in html and "<br>" in html


def test_text_helpers():
    assert tokens.show_whitespace("a b\n\tc") == "a·b↵→c"
    assert tokens.cap_text("abc", 2) == ("ab", True) and tokens.cap_text("abc", 3) == ("abc", False)
    assert tokens.human_count(175e9) == "175B"
    assert tokens.human_count(1.4e12) == "1.4T"
    assert tokens.human_count(1_877_184) == "1.88M"


def test_scale_table_has_the_published_figures_and_our_measured_ones():
    report = json.loads((resolve_model_path("tutor-base") / "training_report.json").read_text())
    rows = {r["model"]: r for r in tokens.scale_rows(report, 128)}
    assert rows["GPT-3"]["parameters"] == "175B" and rows["GPT-3"]["training tokens"] == "300B"
    assert rows["Chinchilla"]["tokens per parameter"] == "20.0"
    assert rows["Llama 2 70B"]["training tokens"] == "2T"
    tutor = rows["tutor-base (this project, measured)"]
    assert tutor["parameters"] == tokens.human_count(report["parameters"])
    assert tutor["training tokens"] == tokens.human_count(report["tokens_seen"])


# -- embeddings ---------------------------------------------------------------------------------


def test_embeddings_page_projects_and_reacts_to_the_method():
    at = page("embeddings")
    assert not at.exception
    seed_pair, paraphrase = (float(m.value) for m in at.metric[:2])
    assert seed_pair < 0.3 < 0.6 < paraphrase
    projection = charts(at)[0]
    assert len(projection["data"]) == len(embeddings_view.PRESETS)  # one trace per topic
    for method, control in (("t-SNE", "Perplexity"), ("UMAP", "Neighbours")):
        at.radio[0].set_value(method).run()
        assert not at.exception
        assert any(s.label.startswith(control) for s in at.slider)
        assert charts(at)[0] != projection
    at.radio[1].set_value("3-D").run()
    assert not at.exception
    assert charts(at)[0]["data"][0]["type"] == "scatter3d"


def test_embeddings_page_single_sentence_and_no_sentence():
    at = page("embeddings")
    at.multiselect[0].set_value([]).run()
    assert not at.exception
    assert any("Pick some preset sentences" in m.value for m in at.info)
    at.text_area[0].set_value("Only one sentence here.").run()
    assert not at.exception
    assert any("needs at least 3 sentences; you have 1" in m.value for m in at.info)


def test_embeddings_page_search_and_arithmetic_react():
    at = page("embeddings")
    at.text_input[0].set_value("I love my cat").run()
    top = at.dataframe[0].value.iloc[0]["sentence"]
    assert top in embeddings_view.PRESETS["pets"]
    arithmetic = [m.value for m in at.markdown if "candidate" in m.value]
    assert "**queen**" in arithmetic[-1]
    at.selectbox[0].set_value("Paris − France + Germany").run()
    assert not at.exception
    assert at.dataframe[1].value.iloc[0]["word"] == "Berlin"


def test_embeddings_page_caps_the_visitors_sentences():
    at = page("embeddings")
    at.text_area[0].set_value("\n".join(f"Sentence number {i}." for i in range(60))).run()
    assert not at.exception
    assert any("first 40 of your 60 lines" in w.value for w in at.warning)


def test_parse_sentences_reports_every_change():
    text = "a\n\n  a \n" + "x" * 400 + "\nb\nc"
    parsed = embeddings_view.parse_sentences(text, already=["a"], max_sentences=3, max_chars=300)
    assert parsed.sentences == ["x" * 300]  # "a" is already shown, "b" and "c" are past the cap
    assert len(parsed.notes) == 3  # lines left out, a line cut, repeats shown once
    assert embeddings_view.SEED_PAIR[0] in embeddings_view.PRESETS["weather"]
    with pytest.raises(ValueError, match="unknown topic"):
        embeddings_view.preset_sentences(["sports"])
