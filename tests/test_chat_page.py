"""The chat page's conversations: listing, titles, rename, delete, export, regenerate, and one
run of the page itself with the tiny tutor model."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage

import chat.session  # noqa: F401  (import the package before AppTest puts pages/ first on sys.path)
from chat.conversations import (
    ChatStore,
    export_json,
    export_markdown,
    messages_from_json,
    short_time,
    thread_config,
    thread_title,
)
from dashboard.lib.chat import RunningAnswer, dropped_note, finetuned_models, turn_stats

ROOT = Path(__file__).resolve().parent.parent


def save_turn(store: ChatStore, thread_id: str, question: str, answer: str) -> None:
    """A turn as `respond` saves it, without a model."""
    reply = AIMessage(
        answer,
        response_metadata={"sources": [{"title": "Tokens", "page": "tokens"}]},
        usage_metadata={"input_tokens": 5, "output_tokens": 3, "total_tokens": 8},
    )
    store.graph.update_state(
        thread_config(thread_id), {"messages": [HumanMessage(question), reply]}, as_node="respond"
    )


def test_threads_listed_with_titles_most_recent_first(tmp_path):
    store = ChatStore(tmp_path / "chat.sqlite")
    save_turn(store, "a", "What is a token?", "A piece of text.")
    save_turn(store, "b", "  Explain   LoRA\nplease " + "x" * 80, "Low-rank adapters.")
    save_turn(store, "a", "And a byte?", "Eight bits.")  # "a" is now the most recent
    infos = store.thread_list()
    assert [i.thread_id for i in infos] == ["a", "b"]
    assert infos[0].title == "What is a token?"  # the first message, not the latest
    assert infos[0].messages == 4
    assert infos[1].title.startswith("Explain LoRA please x") and infos[1].title.endswith("…")
    assert len(infos[1].title) == 48
    assert datetime.fromisoformat(infos[0].updated) >= datetime.fromisoformat(infos[1].updated)


def test_title_helpers():
    assert thread_title([]) == "(empty)"
    assert thread_title([AIMessage("hi"), HumanMessage(" a\n b ")]) == "a b"
    now = datetime(2026, 3, 3, 15, 0, tzinfo=UTC).astimezone()
    assert short_time(now.replace(hour=9, minute=5).isoformat(), now) == "09:05"
    assert short_time("2025-01-02T10:00:00+00:00", now) == "2 Jan 2025"
    assert short_time("not a time", now) == ""


def test_rename_survives_reopening_and_empty_title_resets(tmp_path):
    path = tmp_path / "chat.sqlite"
    store = ChatStore(path)
    save_turn(store, "a", "What is a token?", "A piece of text.")
    store.rename("a", "  Tokens\n101 ")
    store.close()
    again = ChatStore(path)
    assert again.thread_list()[0].title == "Tokens 101"
    assert again.title("a") == "Tokens 101"
    again.rename("a", "")
    assert again.title("a") == "What is a token?"


def test_delete_removes_thread_and_title(tmp_path):
    store = ChatStore(tmp_path / "chat.sqlite")
    save_turn(store, "a", "one", "1")
    save_turn(store, "b", "two", "2")
    store.rename("a", "first")
    store.delete("a")
    assert [i.thread_id for i in store.thread_list()] == ["b"]
    assert store.messages("a") == []
    save_turn(store, "a", "again", "3")  # the id reused: no stale title
    assert store.title("a") == "again"


def test_export_json_round_trips_and_markdown_has_every_message(tmp_path):
    store = ChatStore(tmp_path / "chat.sqlite")
    save_turn(store, "a", "What is a token?", "A **piece** of text.")
    save_turn(store, "a", "And <b>html</b>?", "Shown as typed.")
    messages = store.messages("a")
    data = json.loads(store.export("a", "json"))
    assert data["thread"] == "a" and data["title"] == "What is a token?"
    back = messages_from_json(export_json("a", "t", messages))
    assert [(m.type, m.text) for m in back] == [(m.type, m.text) for m in messages]
    assert back[1].response_metadata["sources"] == [{"title": "Tokens", "page": "tokens"}]
    assert back[1].usage_metadata["output_tokens"] == 3
    markdown = store.export("a", "markdown")
    assert markdown == export_markdown("What is a token?", messages)
    assert markdown.startswith("# What is a token?")
    for m in messages:
        assert m.text in markdown
    assert "Tokens (`tokens`)" in markdown


def test_drop_last_turn_for_regenerate(tmp_path):
    store = ChatStore(tmp_path / "chat.sqlite")
    assert store.drop_last_turn("a") is None  # nothing to regenerate
    save_turn(store, "a", "one", "1")
    save_turn(store, "a", "two", "2")
    assert store.drop_last_turn("a") == "two"
    assert [m.text for m in store.messages("a")] == ["one", "1"]


def test_turn_stats_and_dropped_note():
    usage = {"input_tokens": 1200, "output_tokens": 50}
    assert turn_stats(usage, 3.0, 2.0) == "1,200 tokens in · 50 out · 3.0 s · 25.0 tokens/s"
    assert turn_stats(usage, 2.0) == "1,200 tokens in · 50 out · 2.0 s · 25.0 tokens/s"
    assert "no token counts" in turn_stats(None, 1.0)
    assert dropped_note(0, 10) == ""
    assert "4 oldest messages" in dropped_note(4, 10) and "6 of the 10" in dropped_note(4, 10)


def fake_job(root: Path, job_id: str, status: str, data: str, adapter: bool = True) -> Path:
    """A job folder as dashboard.lib.jobs writes it (no process: the job is over)."""
    folder = root / job_id
    (folder / "output" / "adapter").mkdir(parents=True)
    argv = ["genai-lab", "finetune", "--model", "tutor-base", "--data", data]
    (folder / "command.json").write_text(json.dumps({"argv": argv, "cwd": "/"}))
    (folder / "state.json").write_text(json.dumps({"status": status, "pid": None}))
    if adapter:
        (folder / "output" / "adapter" / "adapter_config.json").write_text("{}")
    return folder


def test_the_picker_lists_the_adapters_of_finished_fine_tunes_newest_first(tmp_path):
    fake_job(tmp_path, "20260301-100000-aaaaaa", "done", "/up/0123456789abcdef-rows.jsonl")
    fake_job(tmp_path, "20260302-100000-bbbbbb", "done", "/data/chat.csv")
    fake_job(tmp_path, "20260303-100000-cccccc", "failed", "/data/x.jsonl")
    fake_job(tmp_path, "20260304-100000-dddddd", "done", "/data/y.jsonl", adapter=False)
    (tmp_path / "not-a-job").mkdir()
    found = finetuned_models(tmp_path)
    assert list(found) == ["20260302-100000-bbbbbb", "20260301-100000-aaaaaa"]
    first = found["20260301-100000-aaaaaa"]
    assert first.label == "fine-tuned tutor-base on rows.jsonl (job 20260301-100000-aaaaaa)"
    assert first.adapter == tmp_path / "20260301-100000-aaaaaa" / "output" / "adapter"
    assert finetuned_models(tmp_path / "nowhere") == {}


def test_halting_an_answer_stops_it_and_waits_until_it_is_saved():
    answer = RunningAnswer()
    saved = []

    def stream():  # what the page's streaming run does: stop when told, then close the turn
        assert answer.stop.wait(5)
        time.sleep(0.05)  # (saving the part shown)
        saved.append(True)
        answer.done.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert answer.halt(timeout=5) and saved == [True]
    worker.join()
    stuck = RunningAnswer()  # a run that never closes its turn: the next run does not hang
    started = time.perf_counter()
    assert not stuck.halt(timeout=0.1) and time.perf_counter() - started < 1


def test_page_lists_the_new_thread_and_puts_it_in_the_url(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("GENAI_LAB_CHAT_DB", str(tmp_path / "chat.sqlite"))
    monkeypatch.setenv("GENAI_LAB_JOBS", str(tmp_path / "jobs"))  # (the picker lists its adapters)
    # The page's first run loads the default model: make it the tiny tutor (the page imports
    # the name on every run, so it sees the patched one).
    monkeypatch.setattr("chat.providers.default_chat_model", lambda: "tutor")
    # Nor MiniLM (the notes are on at first): a stand-in for the first run; the test turns them
    # off before asking.
    monkeypatch.setattr("chat.retrieval.ConceptRetriever", lambda: None)
    page = str(ROOT / "dashboard" / "views" / "chat.py")
    started = time.perf_counter()
    at = AppTest.from_file(page, default_timeout=60).run()
    assert not at.exception
    assert at.selectbox(key="chat_model").value == "tutor"
    at.radio[0].set_value("off")  # the tutor answers without notes
    at.toggle[0].set_value(False)  # no token inspector: a quicker answer
    at.button(key="chat_new").click().run()
    thread = at.query_params["thread"]
    thread = thread[0] if isinstance(thread, list) else thread
    assert thread != "dashboard"  # "New chat" opened a fresh id
    at.chat_input[0].set_value("What is a token?").run()
    assert not at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert any("tokens/s" in c.value for c in at.chat_message[1].caption)
    listed = [b for b in at.sidebar.button if b.key == f"open::{thread}"]
    assert listed and listed[0].label.startswith("What is a token?")
    assert at.query_params["thread"] in (thread, [thread])
    assert ChatStore(tmp_path / "chat.sqlite").messages(thread)[0].text == ("What is a token?")
    # A model that cannot load: one line of error, the conversation still shown.
    at.text_input(key="chat_spec").set_value("/no/such/model").run()
    assert not at.exception and at.error
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert at.chat_input[0].proto.disabled
    at.text_input(key="chat_spec").set_value("").run()
    # Regenerate replaces the last answer; delete asks first, then opens a fresh conversation.
    at.button(key="chat_regenerate").click().run()
    assert not at.exception
    assert len(ChatStore(tmp_path / "chat.sqlite").messages(thread)) == 2
    at.button(key="chat_delete").click().run()
    assert ChatStore(tmp_path / "chat.sqlite").thread_list() != []  # not yet
    at.button(key="chat_delete_yes").click().run()
    assert not at.exception
    assert ChatStore(tmp_path / "chat.sqlite").thread_list() == []
    assert at.query_params["thread"] not in (thread, [thread])
    assert time.perf_counter() - started < 30
